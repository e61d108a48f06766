"""Drive our TensorRT plugin through NVIDIA's ``tensorrt.plugin`` code, without TensorRT.

Run as a script by ``tests/test_trt_static.py`` (in the main venv or in a side venv that holds
only another Triton and numpy): ``python _qdp_probe.py < request.json > result.json``. For each
requested bindings wheel and kernel tiling it installs the native stub (:mod:`_trt_stub`)
under NVIDIA's plugin sources, lets them validate and register our plugin functions, and then
makes the calls TensorRT makes on an ONNX node, in TensorRT's order:

1. the ONNX parser's plugin lookup (``get_creator(op_type, plugin_version, plugin_namespace)``)
   and its attribute -> plugin-field conversion (onnx-tensorrt ``loadFields``);
2. ``create_plugin(..., STRICT_AOT)`` as for a node with ``aot=1``;
3. output types and shapes, format combinations (autotune), ``configure_plugin``;
4. ``get_launch_params`` with an expression builder that evaluates integers, for each shape,
   then ``get_kernel``: the PTX and name TensorRT would embed.

It records what TensorRT would receive (kernel name, PTX, evaluated grid/block/shared memory
and scalar arguments) and whether Triton's own ptxas assembles that PTX. Assertions are the
test's job. The CUDA probe is replaced per case by the requested GPU and driver.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# onnx-tensorrt's loadFields: ONNX attribute type -> (plugin field type, numpy dtype).
_ONNX_TO_FIELD = {
    "FLOAT": ("FLOAT32", "float32"),
    "INT": ("INT32", "int32"),
    "STRING": ("CHAR", None),
}


def _package(name: str, folder: Path, run_init: bool = True) -> None:
    """Register ``folder`` as package ``name`` (its ``__init__`` run only if ``run_init``)."""
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if run_init:
        spec.loader.exec_module(module)


def import_project(repo: Path) -> None:
    """Import maskattn_deploy from ``repo``, with ``plugins/`` as ``maskattn_deploy.plugins``.

    An installed (editable) package already maps it; a bare side venv (Triton and numpy only)
    gets the same layout. There the plugin's only torch-bound import is the package
    ``maskattn_deploy.ops``, whose ``__init__`` re-exports the torch reference; it is loaded as
    a bare package so ``ops.contract`` (plain constants) imports without torch.
    """
    sys.path.insert(0, str(repo))
    if importlib.util.find_spec("maskattn_deploy") is None:
        raise SystemExit(f"maskattn_deploy not found under {repo}")
    if importlib.util.find_spec("maskattn_deploy.plugins") is None:
        _package("maskattn_deploy.plugins", repo / "plugins")
    if importlib.util.find_spec("torch") is None:
        _package("maskattn_deploy.ops", repo / "maskattn_deploy" / "ops", run_init=False)


def ptxas_info(arch: int) -> dict[str, Any]:
    """The ptxas Triton uses for ``sm_<arch>``: path and its ``release X.Y`` (run, not asked)."""
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(arch)
    except TypeError:  # Triton 3.5: one ptxas for every architecture
        tool = compiler.get_ptxas()
    text = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+\.\d+)", text)
    return {"path": tool.path, "release": release[1] if release else None}


def assemble(ptx: str, ptxas: str) -> dict[str, Any]:
    """Assemble ``ptx`` for its own ``.target`` with ``ptxas`` (what the driver's JIT also does)."""
    target = re.search(r"^\.target (\w+)", ptx, re.M)[1]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [ptxas, f"--gpu-name={target}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    return {"rc": proc.returncode, "stderr": proc.stderr[-2000:]}


def creator_info(creator: Any) -> dict[str, Any]:
    return {
        "name": creator.name,
        "namespace": creator.plugin_namespace,
        "version": creator.plugin_version,
        "fields": [[f.name, f.type.name] for f in creator.field_names],
    }


def parser_fields(trt: Any, creator: Any, attributes: dict[str, list]) -> list:
    """Plugin fields from node attributes, the way onnx-tensorrt's loadFields builds them."""
    import numpy as np

    fields = []
    for field in creator.field_names:
        if field.name not in attributes:
            continue
        onnx_type, value = attributes[field.name]
        kind, dtype = _ONNX_TO_FIELD[onnx_type]
        data = value.encode() if dtype is None else np.array([value], dtype=dtype)
        fields.append(trt.PluginField(field.name, data, getattr(trt.PluginFieldType, kind)))
    return fields


def _desc(trt: Any, shape: list[int], dynamic: list[bool], dtype: Any) -> Any:
    desc = trt.DynamicPluginTensorDesc()
    desc.desc.dims = trt.Dims([-1 if d else v for v, d in zip(shape, dynamic, strict=True)])
    desc.desc.type = dtype
    desc.min = desc.opt = desc.max = trt.Dims(shape)
    return desc


def _exprs(trt: Any, shape: list[int], dynamic: list[bool]) -> Any:
    return trt.DimsExprs(
        [trt.IDimensionExpr(v, not d) for v, d in zip(shape, dynamic, strict=True)]
    )


class _Launch:
    """TensorRT's launch-parameter and scalar-argument receivers."""

    def __init__(self) -> None:
        self.nbSymExprs = 0
        self.args: dict[int, Any] = {}

    def __setitem__(self, index: int, value: Any) -> None:
        self.args[index] = value


def launch(trt: Any, plugin: Any, dtypes: list[Any], shape: list[int], dynamic: list[bool]) -> dict:
    """get_output_shapes + get_launch_params + get_kernel for S of ``shape`` (evaluated)."""
    b, _, n, t = shape
    g_shape, g_dyn = [b, 1, n, t], [dynamic[0], False, dynamic[2], dynamic[3]]
    builder = trt.IExprBuilder()
    inputs = [_exprs(trt, shape, dynamic), _exprs(trt, g_shape, g_dyn)]
    (out_exprs,) = plugin.get_output_shapes(inputs, [], builder)
    descs = [_desc(trt, shape, dynamic, dtypes[0]), _desc(trt, g_shape, g_dyn, dtypes[1]),
             _desc(trt, shape, dynamic, dtypes[2])]  # fmt: skip
    plugin.configure_plugin(descs[:2], descs[2:])
    params, setter = _Launch(), _Launch()
    plugin.get_launch_params(inputs, descs, 2, params, setter, builder)
    name, ptx = plugin.get_kernel([d.desc for d in descs[:2]], [d.desc for d in descs[2:]])
    args = [setter.args[i] for i in range(setter.nbSymExprs)]
    value = lambda e: e.expr.value  # noqa: E731  (SymExprImpl -> evaluated expression)
    return {
        "shape": shape,
        "output_shape": [e.value for e in out_exprs],
        "grid": [value(params.grid_x), value(params.grid_y), value(params.grid_z)],
        "block": [value(params.block_x), value(params.block_y), value(params.block_z)],
        "shared_mem": value(params.shared_mem),
        "extra_args": [value(a) for a in args],
        "extra_arg_types": [a.dtype.name for a in args],
        "kernel_name": name.decode() if isinstance(name, bytes) else name,
        "ptx": ptx.decode() if isinstance(ptx, bytes) else ptx,
    }


def run_case(trt: Any, creator: Any, case: dict[str, Any], cuda_check: Any) -> dict[str, Any]:
    """One type combination, GPU and driver: every TensorRT call up to the kernel."""
    dtypes = [{"FP32": trt.float32, "FP16": trt.float16}[x] for x in case["types"]]
    arch = case["arch"]
    cuda_check.probe_cuda = lambda: cuda_check.CudaStatus(
        1, "stub GPU", (arch // 10, arch % 10), tuple(case["driver"])
    )
    fields = trt.PluginFieldCollection(parser_fields(trt, creator, case["attributes"]))
    plugin = creator.create_plugin(
        creator.name, creator.plugin_namespace, fields, trt.TensorRTPhase.BUILD,
        trt.QuickPluginCreationRequest.STRICT_AOT,
    )  # fmt: skip
    result = {key: case[key] for key in ("id", "types", "driver", "arch")}
    result["aot"] = isinstance(plugin, trt.IPluginV3QuickAOTBuild)
    result["output_types"] = [d.name for d in plugin.get_output_data_types(dtypes[:2], [4, 4])]
    shape, dynamic = case["shapes"][0]
    b, _, n, t = shape
    inputs = [
        _exprs(trt, shape, dynamic),
        _exprs(trt, [b, 1, n, t], [dynamic[0], False, *dynamic[2:]]),
    ]
    plugin.get_output_shapes(inputs, [], trt.IExprBuilder())
    offered = plugin.get_supported_format_combinations(
        [_desc(trt, shape, dynamic, d) for d in dtypes], 2
    )
    result["offered"] = [
        [d.type.name for d in offered[i : i + 3]] for i in range(0, len(offered), 3)
    ]
    plugin.set_tactic(0)
    result["launches"] = []
    for shape, dynamic in case["shapes"]:
        try:
            result["launches"].append(launch(trt, plugin, dtypes, shape, dynamic))
        except Exception as exc:  # recorded: the test decides whether it was expected
            result["launches"].append({"shape": shape, "error": f"{type(exc).__name__}: {exc}"})
    return result


def run(request: dict[str, Any]) -> dict[str, Any]:
    import _trt_stub
    import triton
    from maskattn_deploy.plugins.trt_plugin import QDP_PLUGIN_VERSION, define_plugin

    from maskattn_deploy.engine import cuda_check
    from maskattn_deploy.ops.contract import PLUGIN_NAME, PLUGIN_NAMESPACE

    archs = sorted({c["arch"] for r in request["runs"] for c in r["cases"]} | {80})
    out: dict[str, Any] = {"triton_version": triton.__version__, "runs": []}
    out["ptxas"] = {str(a): ptxas_info(a) for a in archs}
    for spec in request["runs"]:
        trt = _trt_stub.install(Path(request["wheels"][spec["wheel"]]))
        trtp = importlib.import_module("tensorrt.plugin")
        define_plugin(trt, trtp, spec["tiling"])  # NVIDIA's validators run here
        creator = trt.get_plugin_registry().get_creator(
            PLUGIN_NAME, QDP_PLUGIN_VERSION, PLUGIN_NAMESPACE
        )
        results = []
        for case in spec["cases"]:
            try:
                row = run_case(trt, creator, case, cuda_check)
            except Exception:
                row = {"id": case["id"], "error": traceback.format_exc(limit=6)}
            for item in row.get("launches", []):
                if "ptx" in item:
                    item["ptxas"] = assemble(item["ptx"], out["ptxas"][str(case["arch"])]["path"])
            results.append(row)
        out["runs"].append({"wheel": spec["wheel"], "tiling": spec["tiling"],
                            "creator": creator_info(creator), "results": results})  # fmt: skip
    return out


def main() -> None:
    request = json.load(sys.stdin)
    sys.path.insert(0, str(HERE))
    import_project(Path(request["repo"]))
    json.dump(run(request), sys.stdout)


if __name__ == "__main__":
    main()
