"""Static checks of the TensorRT plugin: no TensorRT, no GPU, NVIDIA's own plugin code.

``tests/_qdp_probe.py`` runs our plugin through the ``tensorrt.plugin`` sources of the PyPI
bindings wheels (10.9, 10.16 and 11.4) on a stub of the native module, making the calls
TensorRT makes for an ONNX node with ``aot=1``, for GPUs sm_80/86/89/90 and CUDA drivers
12.4/12.9/13.0. What TensorRT would receive is checked here against independent expectations:

1. **PTX vs launch contract**: the entry takes exactly the arguments TensorRT passes (inputs,
   scalar arguments, outputs: 7 parameters; pointers ``.u64`` and int32 scalars ``.u32`` in the
   plugin's order), ``.reqntid`` equals the launch block, and ``.version`` is
   ``min(driver ISA, ptxas ISA)`` (NVIDIA's PTX ISA table below), and Triton's ptxas assembles it.
2. **NVIDIA's validators and launch parameters**: registration, signature validation, plugin
   creation, output types/shapes, format combinations; grid, block, shared memory and scalar
   arguments evaluated for real shapes (an SDXL shape and an uneven one) against the tiling.
3. **Parser dispatch**: a custom node as the exporter writes it carries what onnx-tensorrt needs
   to import it as this plugin (the exported UNet is checked in test_export_pipeline.py).

Each runs under the oldest Triton the package accepts (3.5.0) and the one on the lent GPU
machines (3.6.0), in cached side venvs holding only Triton and numpy, and under this venv's
(newest) Triton. Every type combination runs at every driver and GPU with the default tiling;
every tuning-candidate tiling runs with every type combination, spread over the drivers and
GPUs so each tiling meets all three drivers.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _qdp import NEWEST_WHEEL, finish_probe, probe_command, wheel_versions
from _venvs import side_venv
from maskattn_deploy.plugins import masked_softmax_triton as mst
from maskattn_deploy.plugins.trt_plugin import TYPE_COMBINATIONS, ptx_version_for_driver
from onnx import helper

from maskattn_deploy.engine.network import custom_node_problems
from maskattn_deploy.ops.contract import (
    ONNX_DOMAIN,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

pytestmark = pytest.mark.slow

# NVIDIA's PTX ISA per CUDA release (PTX ISA release notes): what a driver of that version
# JIT-compiles and what a ptxas of that version assembles.
CUDA_ISA = {"12.4": 84, "12.5": 85, "12.6": 85, "12.7": 86, "12.8": 87, "12.9": 88,
            "13.0": 90, "13.1": 91, "13.2": 92, "13.3": 93, "13.4": 94}  # fmt: skip
DRIVERS = ((12, 4), (12, 9), (13, 0))
ARCHS = (80, 86, 89, 90)
TRITONS = ("3.5.0", "3.6.0", "newest")  # oldest accepted, the lent GPU machines', this venv's
# S shapes [b, h, n, t] with the batch dynamic (non-constant at build time): SDXL's first
# gated layer, and an uneven one (heads and tokens not multiples of the tiling, t != 77).
SHAPES = (([2, 10, 4096, 77], [True, False, False, False]),
          ([3, 5, 999, 70], [True, False, False, False]))  # fmt: skip
DYNAMIC_T = ([2, 10, 4096, 77], [True, False, False, True])
DEFAULT_TILING = (4, 1, 1)  # the kernel's documented default for t <= 128 (test_kernel_aot)
# The kernel's calling convention: S, G, n_rows, heads, n_tokens, t, P.
PARAMS = ["u64", "u64", "u32", "u32", "u32", "u32", "u64"]


def exported_node(threshold: float = 0.25) -> Any:
    """A custom node with the attributes the exporter's translation writes (onnx_op)."""
    return helper.make_node(
        PLUGIN_NAME, ["logits", "gate_logits"], ["probs"], domain=ONNX_DOMAIN,
        threshold=threshold, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
        aot=1,
    )  # fmt: skip


def probe_attributes(node: Any) -> dict[str, list]:
    """The node's attributes as the probe takes them: name -> [ONNX type, value]."""
    from onnx import AttributeProto

    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = [AttributeProto.AttributeType.Name(attr.type),
                          value.decode() if isinstance(value, bytes) else value]  # fmt: skip
    return out


def _case(types: tuple[str, ...], driver: tuple[int, int], arch: int, shapes=SHAPES) -> dict:
    return {"id": f"{','.join(types)} driver {driver[0]}.{driver[1]} sm_{arch}",
            "types": list(types), "driver": list(driver), "arch": arch,
            "attributes": probe_attributes(exported_node()), "shapes": [list(s) for s in shapes]}  # fmt: skip


def request() -> dict[str, Any]:
    """Every type at every driver and GPU (default tiling); every tiling with every type."""
    types = [tuple(t.replace(" ", "").split(",")) for t, _, _ in TYPE_COMBINATIONS]
    default = [_case(t, d, a) for d in DRIVERS for a in ARCHS for t in types]
    default.append({**_case(types[2], (12, 9), 90, [DYNAMIC_T]), "id": "dynamic text length"})
    runs = [{"wheel": NEWEST_WHEEL, "tiling": None, "cases": default}]
    for k, tiling in enumerate(mst.TUNING_CANDIDATES):
        cases = [_case(t, DRIVERS[(k + i) % 3], ARCHS[(k + i) % 4]) for i, t in enumerate(types)]
        runs.append({"wheel": NEWEST_WHEEL, "tiling": list(tiling), "cases": cases})
    for wheel in wheel_versions():
        if wheel != NEWEST_WHEEL:
            cases = [_case(t, (12, 9), 90) for t in types]
            runs.append({"wheel": wheel, "tiling": None, "cases": cases})
    return {"runs": runs}


@pytest.fixture(scope="module")
def probes() -> dict[str, Any]:
    """Probe results per Triton label (or the reason it could not run), probes in parallel."""
    pythons: dict[str, Any] = {"newest": sys.executable}
    for version in TRITONS[:-1]:
        try:
            pythons[version] = side_venv(f"triton-{version}", [f"triton=={version}", "numpy"])
        except pytest.skip.Exception as exc:
            pythons[version] = f"skipped: {exc}"
    body = request()
    running = {}
    for label, python in pythons.items():
        if isinstance(python, Path | str) and not str(python).startswith("skipped"):
            argv, env, stdin = probe_command(python, body)
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
            running[label] = (proc, stdin)
    results: dict[str, Any] = {k: v for k, v in pythons.items() if k not in running}
    for label, (proc, stdin) in running.items():
        out, err = proc.communicate(stdin, timeout=1800)
        results[label] = finish_probe(proc.returncode, out, err)
    return results


def result_for(probes: dict[str, Any], label: str) -> dict[str, Any]:
    result = probes[label]
    if isinstance(result, str):
        pytest.skip(f"Triton {label}: {result}")
    return result


def launches(result: dict[str, Any], wheel: str = NEWEST_WHEEL):
    """(run, case, launch) for every launch that produced a kernel."""
    for run in result["runs"]:
        if run["wheel"] != wheel:
            continue
        for case in run["results"]:
            assert "error" not in case, f"{case['id']}: {case['error']}"
            for item in case["launches"]:
                if case["id"] != "dynamic text length":
                    yield run, case, item


def _entry(ptx: str, name: str) -> list[str]:
    """Parameter types of ``.entry name``, parsed here independently of the kernel module."""
    body = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.S)
    assert body, f"no .entry {name}"
    return re.findall(r"\.param \.(\w+)", body[1])


# ---------------------------------------------------------------- 1. PTX vs launch contract


@pytest.mark.parametrize("label", TRITONS)
def test_ptx_matches_the_launch_contract(probes, label: str) -> None:
    result = result_for(probes, label)
    checked = 0
    for _, case, item in launches(result):
        where = f"Triton {result['triton_version']}, {case['id']}, S {item['shape']}"
        assert "error" not in item, f"{where}: {item['error']}"
        ptx, name = item["ptx"], item["kernel_name"]
        params = _entry(ptx, name)
        # TensorRT passes the inputs, then the scalar arguments, then the outputs.
        assert len(params) == 2 + len(item["extra_args"]) + 1, where
        assert params == PARAMS, where
        assert item["extra_arg_types"] == ["INT32"] * 4, where
        reqntid = re.search(r"^\.reqntid (\d+)(?:, (\d+), (\d+))?", ptx, re.M)
        assert reqntid, f"{where}: no .reqntid"
        assert [int(x or 1) for x in reqntid.groups()] == item["block"], where
        assert re.search(rf"^\.target sm_{case['arch']}a?\b", ptx, re.M), where
        assert item["ptxas"]["rc"] == 0, f"{where}: ptxas: {item['ptxas']['stderr']}"
        checked += 1
    assert checked == 2 * (48 + 4 * len(mst.TUNING_CANDIDATES))


@pytest.mark.parametrize("label", TRITONS)
def test_ptx_isa_is_min_of_driver_and_ptxas(probes, label: str) -> None:
    result = result_for(probes, label)
    for _, case, item in launches(result):
        driver, arch = case["driver"], case["arch"]
        release = result["ptxas"][str(arch)]["release"]
        assert release in CUDA_ISA, f"ptxas {release} is not in the PTX ISA table; extend it"
        want = min(CUDA_ISA[f"{driver[0]}.{driver[1]}"], CUDA_ISA[release])
        version = re.search(r"^\.version (\d+)\.(\d+)$", item["ptx"], re.M)
        assert int(version[1]) * 10 + int(version[2]) == want, (case["id"], release)


def test_ptx_version_for_driver_caps_at_the_bundled_ptxas() -> None:
    # Triton's ptxas for each GPU, asked by running it, not through the code under test.
    from _qdp_probe import ptxas_info

    for arch in ARCHS:
        ptxas = CUDA_ISA[ptxas_info(arch)["release"]]
        for driver in DRIVERS:
            want = min(CUDA_ISA[f"{driver[0]}.{driver[1]}"], ptxas)
            assert ptx_version_for_driver(driver, arch) == want, (driver, arch)
    assert ptx_version_for_driver((0, 0), 90) is None  # unknown driver: Triton's default


# ---------------------------------------------------------------- 2. validators, launch


@pytest.mark.parametrize("label", TRITONS)
def test_nvidia_validators_register_and_create_the_aot_plugin(probes, label: str) -> None:
    result = result_for(probes, label)
    wheels = {run["wheel"] for run in result["runs"]}
    assert wheels == set(wheel_versions())
    for run in result["runs"]:
        creator = run["creator"]
        assert (creator["name"], creator["namespace"], creator["version"]) == (
            PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION)  # fmt: skip
        assert creator["fields"] == [["threshold", "FLOAT32"]]
        for case in run["results"]:
            assert "error" not in case, f"{run['wheel']} {case['id']}: {case['error']}"
            assert case["aot"], case["id"]  # aot=1 gave the AOT plugin
            s_type = {"FP32": "FLOAT", "FP16": "HALF"}[case["types"][0]]
            assert case["output_types"] == [s_type]  # P has the dtype of S
            wanted = [{"FP32": "FLOAT", "FP16": "HALF"}[t] for t in case["types"]]
            assert wanted in case["offered"], case["id"]
    older = [c for r in result["runs"] if r["wheel"] != NEWEST_WHEEL for c in r["results"]]
    assert all(item["ptxas"]["rc"] == 0 for c in older for item in c["launches"])


@pytest.mark.parametrize("label", TRITONS)
def test_launch_parameters_for_real_shapes(probes, label: str) -> None:
    result = result_for(probes, label)
    for run, case, item in launches(result):
        rows, warps, heads_per_program = run["tiling"] or DEFAULT_TILING
        b, h, n, t = item["shape"]
        where = f"{case['id']}, tiling {run['tiling']}, S {item['shape']}"
        assert item["output_shape"] == item["shape"], where
        assert item["grid"] == [b * math.ceil(h / heads_per_program) * math.ceil(n / rows), 1, 1]
        assert item["block"] == [32 * warps, 1, 1], where
        assert item["extra_args"] == [b * h * n, h, n, t], where
        # Dynamic shared memory is asked for exactly when the kernel uses shared memory (a row
        # reduction across warps); one warp per program never needs it.
        uses_shared = bool(re.search(r"\b(ld|st|atom|red)\.shared", item["ptx"]))
        assert (item["shared_mem"] > 0) == uses_shared, where
        assert warps > 1 or not uses_shared, where


@pytest.mark.parametrize("label", TRITONS)
def test_dynamic_text_length_is_refused(probes, label: str) -> None:
    result = result_for(probes, label)
    (case,) = [c for c in result["runs"][0]["results"] if c["id"] == "dynamic text length"]
    (item,) = case["launches"]
    assert "ptx" not in item
    assert "text length fixed at build time" in item["error"]


# ---------------------------------------------------------------- 3. parser dispatch


@pytest.fixture(scope="module")
def creator(probes) -> list[tuple[str, str]]:
    return [tuple(f) for f in result_for(probes, "newest")["runs"][0]["creator"]["fields"]]


def test_parser_dispatches_the_exported_node_to_the_plugin(creator) -> None:
    assert custom_node_problems([exported_node()], {PLUGIN_NAME: creator}) == []
    # A node type with no registered plugin would silently take its ONNX function.
    assert "no TensorRT plugin" in custom_node_problems([exported_node()], {PLUGIN_NAME: None})[0]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"plugin_namespace": None}, "plugin_namespace is None"),
        ({"plugin_version": 1}, "plugin_version is ('INT', 1)"),
        ({"aot": "1"}, "aot is ('STRING', b'1')"),
        ({"aot": 0}, "aot is ('INT', 0)"),
        ({"threshold": 1}, "threshold (FLOAT32) needs a FLOAT attribute, found INT"),
        ({"domain": "other"}, "no TensorRT plugin other::MaskedSoftmax"),
    ],
)
def test_parser_dispatch_check_names_what_is_wrong(creator, change: dict, needle: str) -> None:
    node = exported_node()
    ((key, value),) = change.items()
    if key == "domain":
        node.domain = value
    else:
        kept = [a for a in node.attribute if a.name != key]
        del node.attribute[:]
        node.attribute.extend(kept)
        if value is not None:
            node.attribute.append(helper.make_attribute(key, value))
    problems = custom_node_problems([node], {PLUGIN_NAME: creator})
    assert any(needle in p for p in problems), problems


# ---------------------------------------------------------------- the ONNX schema


def test_onnx_schema_admits_exactly_the_plugins_types() -> None:
    from maskattn_deploy.export.onnx_op import op_schema

    onnx_types = {"tensor(float)": "fp32", "tensor(float16)": "fp16"}
    constraints = {c.type_param_str: c.allowed_type_strs for c in op_schema().type_constraints}
    assert set(constraints["T"]) == set(constraints["T1"]) == set(onnx_types)  # no bf16
    admitted = {(onnx_types[s], onnx_types[g]) for s in constraints["T"] for g in constraints["T1"]}
    assert admitted == {(s, g) for _, s, g in TYPE_COMBINATIONS}


# ---------------------------------------------------------------- declared Triton versions


def test_every_extra_declares_the_oldest_triton_tested() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    specs = {
        name: [r for r in reqs if re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0] == "triton"]
        for name, reqs in extras.items()
    }  # the triton package itself, not tritonclient
    oldest = TRITONS[0].rsplit(".", 1)[0]  # 3.5.0 -> 3.5
    assert {name: spec for name, spec in specs.items() if spec} == {
        name: [f"triton>={oldest}"] for name in ("trt", "gpu", "kernels", "dev")
    }
