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


def io_shapes(kind: str, shape: list[int], dynamic: list[bool]) -> list[tuple[list, list]]:
    """``(shape, dynamic)`` of each input then the output of the ``kind`` plugin.

    ``softmax``: ``shape`` is S ``[b,h,n,t]``; inputs S, G ``[b,1,n,t]``, output like S.
    ``attention``: ``shape`` is ``[b,h,n,t,d]``; inputs q ``[b,h,n,d]``, k and v ``[b,h,t,d]``,
    G ``[b,n,t]``, output like q.
    """
    if kind == "softmax":
        b, _, n, t = shape
        g = ([b, 1, n, t], [dynamic[0], False, dynamic[2], dynamic[3]])
        return [(shape, dynamic), g, (shape, dynamic)]
    (b, h, n, t, d), (db, dh, dn, dt, dd) = shape, dynamic
    q, kv = ([b, h, n, d], [db, dh, dn, dd]), ([b, h, t, d], [db, dh, dt, dd])
    return [q, kv, kv, ([b, n, t], [db, dn, dt]), q]


def launch(
    trt: Any, plugin: Any, dtypes: list[Any], shape: list[int], dynamic: list[bool], kind: str
) -> dict:
    """get_output_shapes + get_launch_params + get_kernel for ``shape`` (evaluated)."""
    io = io_shapes(kind, shape, dynamic)
    n_in = len(io) - 1
    builder = trt.IExprBuilder()
    inputs = [_exprs(trt, s, d) for s, d in io[:n_in]]
    (out_exprs,) = plugin.get_output_shapes(inputs, [], builder)
    descs = [_desc(trt, s, d, dtype) for (s, d), dtype in zip(io, dtypes, strict=True)]
    plugin.configure_plugin(descs[:n_in], descs[n_in:])
    params, setter = _Launch(), _Launch()
    plugin.get_launch_params(inputs, descs, n_in, params, setter, builder)
    name, ptx = plugin.get_kernel([d.desc for d in descs[:n_in]], [d.desc for d in descs[n_in:]])
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


def run_case(
    trt: Any, creator: Any, case: dict[str, Any], cuda_check: Any, kind: str = "softmax"
) -> dict[str, Any]:
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
    io = io_shapes(kind, *case["shapes"][0])
    n_in = len(io) - 1
    result["output_types"] = [
        d.name for d in plugin.get_output_data_types(dtypes[:n_in], [len(s) for s, _ in io[:n_in]])
    ]
    plugin.get_output_shapes([_exprs(trt, s, d) for s, d in io[:n_in]], [], trt.IExprBuilder())
    offered = plugin.get_supported_format_combinations(
        [_desc(trt, s, d, dtype) for (s, d), dtype in zip(io, dtypes, strict=True)], n_in
    )
    width = len(io)
    result["offered"] = [
        [d.type.name for d in offered[i : i + width]] for i in range(0, len(offered), width)
    ]
    plugin.set_tactic(0)
    result["launches"] = []
    for shape, dynamic in case["shapes"]:
        try:
            result["launches"].append(launch(trt, plugin, dtypes, shape, dynamic, kind))
        except Exception as exc:  # recorded: the test decides whether it was expected
            result["launches"].append({"shape": shape, "error": f"{type(exc).__name__}: {exc}"})
    return result


def run(request: dict[str, Any]) -> dict[str, Any]:
    import _trt_stub
    import triton
    from maskattn_deploy.plugins.trt_attention_plugin import define_attention_plugin
    from maskattn_deploy.plugins.trt_plugin import QDP_PLUGIN_VERSION, define_plugin

    from maskattn_deploy.engine import cuda_check
    from maskattn_deploy.ops.contract import ATTENTION_PLUGIN_NAME, PLUGIN_NAME, PLUGIN_NAMESPACE

    plugins = {  # run["plugin"] -> (definition, op_type)
        "softmax": (define_plugin, PLUGIN_NAME),
        "attention": (define_attention_plugin, ATTENTION_PLUGIN_NAME),
    }

    archs = sorted({c["arch"] for r in request["runs"] for c in r["cases"]} | {80})
    out: dict[str, Any] = {"triton_version": triton.__version__, "runs": []}
    out["ptxas"] = {str(a): ptxas_info(a) for a in archs}
    for spec in request["runs"]:
        trt = _trt_stub.install(Path(request["wheels"][spec["wheel"]]))
        trtp = importlib.import_module("tensorrt.plugin")
        kind = spec.get("plugin", "softmax")
        define, op_type = plugins[kind]
        define(trt, trtp, spec["tiling"])  # NVIDIA's validators run here
        creator = trt.get_plugin_registry().get_creator(
            op_type, QDP_PLUGIN_VERSION, PLUGIN_NAMESPACE
        )
        results = []
        for case in spec["cases"]:
            try:
                row = run_case(trt, creator, case, cuda_check, kind)
            except Exception:
                row = {"id": case["id"], "error": traceback.format_exc(limit=6)}
            for item in row.get("launches", []):
                if "ptx" in item:
                    item["ptxas"] = assemble(item["ptx"], out["ptxas"][str(case["arch"])]["path"])
            results.append(row)
        out["runs"].append({"wheel": spec["wheel"], "tiling": spec["tiling"], "plugin": kind,
                            "creator": creator_info(creator), "results": results})  # fmt: skip
    return out


def main() -> None:
    request = json.load(sys.stdin)
    sys.path.insert(0, str(HERE))
    import_project(Path(request["repo"]))
    json.dump(run(request), sys.stdout)


if __name__ == "__main__":
    main()
