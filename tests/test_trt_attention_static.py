"""Static checks of the fused ``MaskedCrossAttention`` TensorRT plugin: no TensorRT, no GPU.

Like test_trt_static.py for the masked-softmax plugin: ``tests/_qdp_probe.py`` runs the plugin
through NVIDIA's ``tensorrt.plugin`` sources of the PyPI bindings wheels on a stub of the native
module and makes the calls TensorRT makes for an ONNX node with ``aot=1``. What TensorRT would
receive is checked here against expectations computed independently: the PTX entry takes
exactly the arguments TensorRT passes (4 input pointers, 15 int32 scalars, the output pointer),
its ``.version`` is ``min(driver ISA, ptxas ISA)`` and Triton's ptxas assembles it; grid,
block and the scalar arguments (sizes and contiguous strides) for real shapes; the refusal of
a dynamic text length or head dim; the exported node carries what the ONNX parser needs.
Runs under this venv's Triton (the oldest accepted Triton is covered for the kernel by the
masked-softmax plugin's side venvs; this plugin shares its compile helpers).
"""

from __future__ import annotations

import math
import re
import struct

import pytest
from _qdp import NEWEST_WHEEL, run_probe, wheel_versions
from maskattn_deploy.plugins import gated_attention_triton as gat
from maskattn_deploy.plugins.trt_attention_plugin import TYPE_COMBINATIONS
from onnx import helper
from test_trt_static import CUDA_ISA  # NVIDIA's PTX ISA per CUDA release

from maskattn_deploy.engine.network import custom_node_problems
from maskattn_deploy.ops.contract import (
    ATTENTION_PLUGIN_NAME,
    ONNX_DOMAIN,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

pytestmark = pytest.mark.slow

THRESHOLD, SCALE = 0.25, 0.125
# [b, h, n, t, d] with the batch and the latent tokens dynamic: SDXL's mid stage, an uneven
# shape (heads, tokens, t and d not multiples of anything) and the tiny model's.
DYN = [True, False, True, False, False]
SHAPES = (([2, 20, 1024, 77, 64], DYN), ([3, 5, 999, 70, 80], DYN), ([2, 2, 64, 77, 16], DYN))
PARAMS = ["u64"] * 4 + ["u32"] * 15 + ["u64"]


def exported_node():  # noqa: ANN201
    """A fused node with the attributes the exporter's translation writes (onnx_op)."""
    return helper.make_node(
        ATTENTION_PLUGIN_NAME, ["q", "k", "v", "g"], ["o"], domain=ONNX_DOMAIN,
        threshold=THRESHOLD, scale=SCALE, plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION, aot=1,
    )  # fmt: skip


def _attributes() -> dict[str, list]:
    from onnx import AttributeProto

    out = {}
    for attr in exported_node().attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = [AttributeProto.AttributeType.Name(attr.type),
                          value.decode() if isinstance(value, bytes) else value]  # fmt: skip
    return out


def _case(types: str, driver: tuple[int, int], arch: int, shapes=SHAPES) -> dict:
    return {"id": f"{types} driver {driver[0]}.{driver[1]} sm_{arch}",
            "types": types.replace(" ", "").split(","), "driver": list(driver), "arch": arch,
            "attributes": _attributes(), "shapes": [list(s) for s in shapes]}  # fmt: skip


@pytest.fixture(scope="module")
def result() -> dict:
    """Every type on sm_90 / driver 12.9, fp16 on the other GPUs and drivers, one tiling with
    head groups, the dynamic-length refusals, and the older bindings wheels."""
    types = [t for t, _, _ in TYPE_COMBINATIONS]
    fp16 = types[2]
    cases = [_case(t, (12, 9), 90) for t in types]
    cases += [_case(fp16, d, a) for d, a in (((12, 4), 80), ((13, 0), 86), ((12, 9), 89))]
    for what, flags in (("text length", [True, False, True, True, False]),
                        ("head dim", [True, False, True, False, True])):  # fmt: skip
        cases.append({**_case(fp16, (12, 9), 90, [(SHAPES[0][0], flags)]), "id": f"dynamic {what}"})
    runs = [{"wheel": NEWEST_WHEEL, "tiling": None, "plugin": "attention", "cases": cases}]
    runs.append({"wheel": NEWEST_WHEEL, "tiling": [16, 4, 2], "plugin": "attention",
                 "cases": [_case(fp16, (12, 9), 90)]})  # fmt: skip
    for wheel in wheel_versions():
        if wheel != NEWEST_WHEEL:
            runs.append({"wheel": wheel, "tiling": None, "plugin": "attention",
                         "cases": [_case(fp16, (12, 9), 90)]})  # fmt: skip
    return run_probe({"runs": runs})


def _launches(result: dict):
    for run in result["runs"]:
        for case in run["results"]:
            assert "error" not in case, f"{run['wheel']} {case['id']}: {case['error']}"
            if not case["id"].startswith("dynamic"):
                for item in case["launches"]:
                    assert "error" not in item, f"{case['id']} {item['shape']}: {item['error']}"
                    yield run, case, item


def _entry(ptx: str, name: str) -> list[str]:
    body = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.S)
    assert body, f"no .entry {name}"
    return re.findall(r"\.param \.(\w+)", body[1])


def test_ptx_matches_the_launch_contract(result: dict) -> None:
    checked = 0
    for _, case, item in _launches(result):
        where = f"{case['id']}, {item['shape']}"
        ptx = item["ptx"]
        assert _entry(ptx, item["kernel_name"]) == PARAMS, where
        assert item["extra_arg_types"] == ["INT32"] * 15, where
        reqntid = re.search(r"^\.reqntid (\d+)", ptx, re.M)
        assert reqntid and int(reqntid[1]) == item["block"][0], where
        assert re.search(rf"^\.target sm_{case['arch']}a?\b", ptx, re.M), where
        driver = CUDA_ISA[f"{case['driver'][0]}.{case['driver'][1]}"]
        ptxas = CUDA_ISA[result["ptxas"][str(case["arch"])]["release"]]
        version = re.search(r"^\.version (\d+)\.(\d+)$", ptx, re.M)
        assert int(version[1]) * 10 + int(version[2]) == min(driver, ptxas), where
        assert item["ptxas"]["rc"] == 0, f"{where}: {item['ptxas']['stderr']}"
        # The node's scale is compiled in as a PTX float literal, like the threshold when the
        # gate logits are fp32 (fp16 gates may be compared in fp16).
        baked = (SCALE, THRESHOLD) if case["types"][3] == "FP32" else (SCALE,)
        for value in baked:
            assert "0f" + struct.pack(">f", value).hex().upper() in ptx, where
        checked += 1
    assert checked == len(SHAPES) * (4 + 3 + 1 + len(wheel_versions()) - 1)


def test_launch_parameters_for_real_shapes(result: dict) -> None:
    for run, case, item in _launches(result):
        b, h, n, t, d = item["shape"]
        block_n, warps, group = run["tiling"] or (*gat.default_rows(gat.block_t(t)), 1)
        where = f"{case['id']}, tiling {run['tiling']}, {item['shape']}"
        assert item["output_shape"] == [b, h, n, d], where
        assert item["grid"] == [b * math.ceil(h / group) * math.ceil(n / block_n), 1, 1], where
        assert item["block"] == [32 * warps, 1, 1], where
        # heads, n, t, d, then the strides of contiguous q, k/v, G and o.
        want = [h, n, t, d, h * n * d, n * d, d, h * t * d, t * d, d, n * t, t, h * n * d, n * d, d]
        assert item["extra_args"] == want, where
        assert item["shared_mem"] > 0, where  # tl.dot operands are staged in shared memory


def test_nvidia_validators_register_and_create_the_aot_plugin(result: dict) -> None:
    assert {run["wheel"] for run in result["runs"]} == set(wheel_versions())
    names = {"FP32": "FLOAT", "FP16": "HALF"}
    for run in result["runs"]:
        creator = run["creator"]
        assert (creator["name"], creator["namespace"], creator["version"]) == (
            ATTENTION_PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION)  # fmt: skip
        assert creator["fields"] == [["threshold", "FLOAT32"], ["scale", "FLOAT32"]]
        for case in run["results"]:
            assert case["aot"], case["id"]
            assert case["output_types"] == [names[case["types"][0]]]  # o like q
            assert [names[x] for x in case["types"]] in case["offered"], case["id"]


@pytest.mark.parametrize("what", ["text length", "head dim"])
def test_dynamic_text_length_and_head_dim_are_refused(result: dict, what: str) -> None:
    (case,) = [c for c in result["runs"][0]["results"] if c["id"] == f"dynamic {what}"]
    (item,) = case["launches"]
    assert "ptx" not in item and f"{what} fixed at build time" in item["error"]


def test_parser_dispatches_the_exported_node_to_the_plugin(result: dict) -> None:
    fields = [tuple(f) for f in result["runs"][0]["creator"]["fields"]]
    creators = {ATTENTION_PLUGIN_NAME: fields}
    assert custom_node_problems([exported_node()], creators) == []
    node = exported_node()
    kept = [a for a in node.attribute if a.name != "scale"]
    del node.attribute[:]
    node.attribute.extend(kept)
    problems = custom_node_problems([node], creators)
    assert any("plugin field scale (FLOAT32) needs a FLOAT attribute" in p for p in problems)


def test_onnx_schema_admits_exactly_the_plugins_types() -> None:
    from maskattn_deploy.export.onnx_op import attention_op_schema

    onnx_types = {"tensor(float)": "fp32", "tensor(float16)": "fp16"}
    schema = attention_op_schema()
    constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    assert set(constraints["T"]) == set(constraints["T1"]) == set(onnx_types)
    admitted = {(onnx_types[x], onnx_types[g]) for x in constraints["T"] for g in constraints["T1"]}
    assert admitted == {(x, g) for _, x, g in TYPE_COMBINATIONS}
