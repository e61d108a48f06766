"""Checks and edits on a parsed TensorRT network, between the ONNX parser and the build.

Every custom node type of the export (:data:`maskattn_deploy.export.onnx_op.NODE_TYPES`) is
meant to become a TensorRT Python plugin layer of the same name in namespace
:data:`PLUGIN_NAMESPACE`:

* :func:`custom_node_problems`: what TensorRT's ONNX parser needs to dispatch a custom node to
  its plugin (onnx-tensorrt): ``op_type`` = a registered plugin name, a STRING
  ``plugin_namespace`` (here equal to the node's domain) and ``plugin_version`` "1", an INT
  ``aot`` = 1 (the AOT implementation), and each of the plugin creator's fields as an attribute
  of the type the parser converts into that field (FLOAT -> a float field, INT -> an integer
  field, STRING -> CHAR).
* :func:`plugin_layer_counts` / :func:`check_plugin_layers`: the parser imports a custom node
  as a plugin layer only when a plugin with its name, version and namespace is registered;
  otherwise it silently falls back to the node's model-local function and the engine computes
  the same numbers without the kernel. The build is refused unless, per node type, every
  custom node became a layer of its plugin.
* :func:`keep_outputs`: unmark the network outputs the runtime does not read, so TensorRT can
  prune what only they needed.
* :func:`use_timing_cache`: a timing cache that TensorRT refuses (made on another GPU or
  TensorRT version) is replaced by an empty one with a warning instead of being ignored.

The TensorRT module is passed in (``trt``) and only the documented Python API is used.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maskattn_deploy.errors import ExportError, UserError
from maskattn_deploy.ops.contract import PLUGIN_NAMESPACE, PLUGIN_VERSION

logger = logging.getLogger(__name__)

# The ONNX attribute type onnx-tensorrt's loadFields converts into each plugin field type.
_FIELD_ATTRIBUTE = {
    **dict.fromkeys(("FLOAT16", "FLOAT32", "FLOAT64", "BF16"), "FLOAT"),
    **dict.fromkeys(("INT8", "INT16", "INT32", "INT64"), "INT"),
    "CHAR": "STRING",
}


def onnx_custom_nodes(onnx_path: Path) -> list[Any]:
    """The custom nodes of the main graph (each must become a plugin layer)."""
    import onnx

    from maskattn_deploy.export.onnx_op import custom_nodes

    model = onnx.load(str(onnx_path), load_external_data=False)
    return custom_nodes(model.graph.node)


def custom_node_counts(onnx_path: Path) -> dict[str, int]:
    """Custom nodes per op type, e.g. ``{"MaskedSoftmax": 70}``."""
    return dict(Counter(node.op_type for node in onnx_custom_nodes(onnx_path)))


def _attribute(node: Any, name: str) -> tuple[str, Any] | None:
    """(ONNX type name, value) of a node attribute, None when absent."""
    from onnx import AttributeProto, helper

    for attr in node.attribute:
        if attr.name == name:
            return AttributeProto.AttributeType.Name(attr.type), helper.get_attribute_value(attr)
    return None


def custom_node_problems(
    nodes: Sequence[Any], creator_fields: Mapping[str, Sequence[tuple[str, str]] | None]
) -> list[str]:
    """Why the ONNX parser would not make each node a layer of its AOT plugin ([] = it would).

    ``creator_fields`` maps an op type to its plugin creator's ``(field, PluginFieldType name)``
    list, or to None when no plugin of that name is registered.
    """
    problems: list[str] = []
    for node in nodes:
        where = f"custom node {node.name or node.op_type}"
        fields = creator_fields.get(node.op_type)
        if fields is None or node.domain != PLUGIN_NAMESPACE:
            problems.append(
                f"{where}: no TensorRT plugin {node.domain}::{node.op_type} version "
                f"{PLUGIN_VERSION} is registered"
            )
            continue
        wanted = {"plugin_namespace": ("STRING", node.domain.encode()),
                  "plugin_version": ("STRING", PLUGIN_VERSION.encode()), "aot": ("INT", 1)}  # fmt: skip
        for name, expected in wanted.items():
            if _attribute(node, name) != expected:
                problems.append(f"{where}: {name} is {_attribute(node, name)}, needs {expected}")
        for name, field_type in fields:
            found = _attribute(node, name)
            needed = _FIELD_ATTRIBUTE.get(field_type)
            if found is None or found[0] != needed:
                problems.append(f"{where}: plugin field {name} ({field_type}) needs a {needed} "
                                f"attribute, found {found and found[0]}")  # fmt: skip
    return problems


def check_custom_nodes(trt: Any, onnx_path: Path) -> None:
    """Refuse an ONNX file whose custom nodes the parser would not import as their plugins."""
    nodes = onnx_custom_nodes(onnx_path)
    registry = trt.get_plugin_registry()
    fields: dict[str, list[tuple[str, str]] | None] = {}
    for op_type in {node.op_type for node in nodes}:
        creator = registry.get_creator(op_type, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        fields[op_type] = (
            None if creator is None else [(f.name, f.type.name) for f in creator.field_names]
        )
    problems = custom_node_problems(nodes, fields)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ExportError(
            f"{onnx_path}: {'; '.join(problems[:3])}{more}; TensorRT would run these nodes "
            "through their ONNX functions, without the kernels"
        )


def plugin_layer_counts(trt: Any, network: Any) -> dict[str, int]:
    """Layers of ``network`` per plugin name, for IPluginV3 layers in our namespace."""
    counts: Counter[str] = Counter()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # get_layer returns the ILayer base class
        core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
        if core.plugin_namespace == PLUGIN_NAMESPACE:
            counts[core.plugin_name] += 1
    return dict(counts)


def check_plugin_layers(
    plugin_layers: Mapping[str, int], custom_nodes: Mapping[str, int], onnx_path: Path
) -> None:
    """Refuse a network where not every custom node became a layer of its plugin."""
    for op_type in sorted(set(plugin_layers) | set(custom_nodes)):
        made, wanted = plugin_layers.get(op_type, 0), custom_nodes.get(op_type, 0)
        if made != wanted:
            raise ExportError(
                f"TensorRT made {made} {PLUGIN_NAMESPACE}::{op_type} plugin layers from the "
                f"{wanted} {op_type} custom nodes of {onnx_path}: the others fell back to the "
                "ONNX function, which would give an engine without the kernel; check that the "
                f"plugin (version {PLUGIN_VERSION}) is registered before parsing"
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
