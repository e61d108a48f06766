"""Checks and edits on a parsed TensorRT network, between the ONNX parser and the build.

* :func:`custom_node_problems`: what TensorRT's ONNX parser needs to dispatch a custom node to
  our plugin (onnx-tensorrt): ``op_type`` = the registered plugin name, a STRING
  ``plugin_namespace`` (here equal to the node's domain) and ``plugin_version`` "1", an INT
  ``aot`` = 1 (the AOT implementation), and each of the plugin creator's fields as an attribute
  of the type the parser converts into that field (FLOAT -> a float field, INT -> an integer
  field, STRING -> CHAR).
* :func:`plugin_layer_count` / :func:`check_plugin_layers`: the ONNX parser imports a custom
  node as a plugin layer only when a plugin with its name, version and namespace is registered;
  otherwise it silently falls back to the node's model-local function and the engine computes
  the same numbers without the kernel. The build is refused unless every custom node became a
  layer of our plugin.
* :func:`keep_outputs`: unmark the network outputs the runtime does not read, so TensorRT can
  prune what only they needed.
* :func:`use_timing_cache`: a timing cache that TensorRT refuses (made on another GPU or
  TensorRT version) is replaced by an empty one with a warning instead of being ignored.

The TensorRT module is passed in (``trt``) and only the documented Python API is used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import ExportError, UserError
from maskattn_deploy.ops.contract import PLUGIN_ID, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

logger = logging.getLogger(__name__)


# The ONNX attribute type onnx-tensorrt's loadFields converts into each plugin field type.
_FIELD_ATTRIBUTE = {
    **dict.fromkeys(("FLOAT16", "FLOAT32", "FLOAT64", "BF16"), "FLOAT"),
    **dict.fromkeys(("INT8", "INT16", "INT32", "INT64"), "INT"),
    "CHAR": "STRING",
}


def onnx_custom_nodes(onnx_path: Path) -> list[Any]:
    """Masked-softmax custom nodes of the main graph (each must become a plugin layer)."""
    import onnx

    from maskattn_deploy.export.onnx_op import custom_nodes

    model = onnx.load(str(onnx_path), load_external_data=False)
    return custom_nodes(model.graph.node)


def custom_node_count(onnx_path: Path) -> int:
    return len(onnx_custom_nodes(onnx_path))


def _attribute(node: Any, name: str) -> tuple[str, Any] | None:
    """(ONNX type name, value) of a node attribute, None when absent."""
    from onnx import AttributeProto, helper

    for attr in node.attribute:
        if attr.name == name:
            return AttributeProto.AttributeType.Name(attr.type), helper.get_attribute_value(attr)
    return None


def custom_node_problems(
    nodes: Sequence[Any], creator_fields: Sequence[tuple[str, str]]
) -> list[str]:
    """Why the ONNX parser would not make each node a layer of our AOT plugin ([] = it would).

    ``creator_fields`` are the plugin creator's ``(field name, PluginFieldType name)``.
    """
    problems: list[str] = []
    for node in nodes:
        where = f"custom node {node.name or node.op_type}"
        wanted = {"plugin_namespace": ("STRING", node.domain.encode()),
                  "plugin_version": ("STRING", PLUGIN_VERSION.encode()), "aot": ("INT", 1)}  # fmt: skip
        if node.op_type != PLUGIN_NAME or node.domain != PLUGIN_NAMESPACE:
            problems.append(f"{where}: op {node.domain}::{node.op_type}, the plugin is {PLUGIN_ID}")
        for name, expected in wanted.items():
            if _attribute(node, name) != expected:
                problems.append(f"{where}: {name} is {_attribute(node, name)}, needs {expected}")
        for name, field_type in creator_fields:
            found = _attribute(node, name)
            needed = _FIELD_ATTRIBUTE.get(field_type)
            if found is None or found[0] != needed:
                problems.append(f"{where}: plugin field {name} ({field_type}) needs a {needed} "
                                f"attribute, found {found and found[0]}")  # fmt: skip
    return problems


def check_custom_nodes(onnx_path: Path, creator: Any) -> None:
    """Refuse an ONNX file whose custom nodes the parser would not import as our plugin."""
    fields = [(field.name, field.type.name) for field in creator.field_names]
    problems = custom_node_problems(onnx_custom_nodes(onnx_path), fields)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportError(
            f"{onnx_path}: {'; '.join(problems[:3])}{more}; re-run maskattn-deploy export"
        )


def plugin_layer_count(trt: Any, network: Any) -> int:
    """Layers of ``network`` that run our plugin (IPluginV3 layers with its name and namespace)."""
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # get_layer returns the ILayer base class
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        if (core.plugin_namespace, core.plugin_name) == (PLUGIN_NAMESPACE, PLUGIN_NAME):
            count += 1
    return count


def check_plugin_layers(plugin_layers: int, custom_nodes: int, onnx_path: Path) -> None:
    """Refuse a network where not every custom node became a layer of our plugin."""
    if plugin_layers != custom_nodes:
        raise ExportError(
            f"TensorRT made {plugin_layers} {PLUGIN_ID} plugin layers from the {custom_nodes} "
            f"custom nodes of {onnx_path}: the others fell back to the ONNX function, which "
            f"would give an engine without the kernel; check that the plugin "
            f"{PLUGIN_ID} version {PLUGIN_VERSION} is registered before parsing"
        )


def keep_outputs(network: Any, keep: Sequence[str] | None, component: str) -> list[str]:
    """Unmark every network output not in ``keep`` (None keeps all); returns the kept names."""
    tensors = [network.get_output(i) for i in range(network.num_outputs)]
    names = [tensor.name for tensor in tensors]
    if keep is None:
        return names
    unknown = sorted(set(keep) - set(names))
    if unknown:
        raise UserError(
            f"{component} has no output(s) {', '.join(unknown)}; its outputs are {', '.join(names)}"
        )
    for tensor in tensors:
        if tensor.name not in keep:
            network.unmark_output(tensor)
    return [name for name in names if name in keep]


def use_timing_cache(config: Any, data: bytes, path: Path) -> Any:
    """Attach the timing cache from ``data`` to ``config``; an empty one if TensorRT refuses it."""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    logger.warning(
        "TensorRT refused the timing cache %s (made on another GPU or TensorRT version, or "
        "corrupt); building with an empty cache, which replaces that file afterwards",
        path,
    )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise ExportError("TensorRT refused an empty timing cache; rerun with -vv for its log")
    return cache
