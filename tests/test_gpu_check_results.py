"""The GPU check's typed results: the JSON rules of ``results.json`` and the CUDA-graph helper."""

from __future__ import annotations

import pytest
import torch

from maskattn_deploy.bench.gpu_check.plan import CheckConfig
from maskattn_deploy.bench.gpu_check.report import render_markdown
from maskattn_deploy.bench.gpu_check.results import (
    AttentionData,
    AttentionShape,
    CallTiming,
    CaseResult,
    CopyCeiling,
    Environment,
    GateFlips,
    GateHeadData,
    ImplResult,
    Part,
    Ratio,
    StepTiming,
    UNetData,
    Variant,
    VariantResult,
    to_json,
)
from maskattn_deploy.bench.gpu_check.run import new_results
from maskattn_deploy.bench.gpu_check.verdict import verdict


def test_none_is_left_out_unless_the_field_keeps_it() -> None:
    # A skipped variant is only its status and reason; a ratio without pairs says null.
    assert to_json(VariantResult("skipped", reason="budget")) == {
        "status": "skipped",
        "reason": "budget",
    }
    assert to_json(Ratio("m", "u", 1.2, 1.1)) == {
        "masked": "m", "unmasked": "u", "ratio_median": 1.2, "ratio_min": 1.1,
        "ratio_paired": None,
    }  # fmt: skip
    # A CPU environment: no card keys at all, torch_cuda_build null (the class keeps None).
    env = to_json(Environment("cpu", "3.12", "linux", 2, {"triton": None}, None, False))
    assert env == {
        "device": "cpu", "python": "3.12", "platform": "linux", "cpu_count": 2,
        "versions": {"triton": None}, "torch_cuda_build": None, "triton_interpret": False,
    }  # fmt: skip


def test_flattened_fields_merge_and_keys_can_be_renamed() -> None:
    timing = StepTiming(2.0, 1.0, 3, 0.5, None, True, "perf_counter")
    row = VariantResult("ok", variant=Variant("eager_unmasked", False, "stock", False),
                        timing=timing)  # fmt: skip
    assert to_json(row) == {
        "status": "ok", "name": "eager_unmasked", "masked": False, "impl": "stock",
        "compiled": False, "graphed": False, "median_ms": 2.0, "min_ms": 1.0, "samples": 3,
        "first_call_s": 0.5, "peak_memory_bytes": None, "output_finite": True,
        "method": "perf_counter",
    }  # fmt: skip
    ceiling = CopyCeiling(4096, CallTiming(1.0, 0.5, 3, 3, "cuda-graph", gbps=4.1))
    assert to_json(ceiling) == {"bytes": 4096, "median_us": 1.0, "min_us": 0.5, "samples": 3,
                                "inner": 3, "method": "cuda-graph", "gbps": 4.1}  # fmt: skip
    case = to_json(CaseResult("all-open", 0.0, "float16", [1, 2], 0.0, 2e-3, {}, True))
    assert case["pass"] is True and "passed" not in case


def test_a_part_that_did_not_start_its_data_is_only_its_envelope() -> None:
    results = new_results(CheckConfig(out="x", dry_run=True))
    reason = "budget: kernel needs ~10 s, 0 s of 1 s left"
    results.parts.kernel = Part("skipped", reason=reason)
    data = to_json(results)
    assert data["parts"] == {"kernel": {"status": "skipped", "reason": reason}}
    assert data["config"] == {"out": "x", "dry_run": True, "budget_s": 480.0,
                              "skip_compile": False, "seed": 0}  # fmt: skip
    assert "verdict" not in data and data["complete"] is False
    results.verdict = verdict(results)
    assert results.verdict.ok is True and results.verdict.kernel_correct is None
    assert all(t.measured is None and t.met is None for t in results.verdict.targets.values())
    text = render_markdown(results)
    assert "| kernel | skipped |" in text and "| unet | not reached | - |  |" in text


def _unet(ratios: dict[str, Ratio]) -> UNetData:
    return UNetData("sdxl", "float16", 1.0, 1, 1, 50, "mid", "inductor", {}, ratios=ratios)


def test_targets_are_judged_on_the_best_fused_path_and_the_slowest_shape() -> None:
    results = new_results(CheckConfig(out="x"))  # a GPU run: targets are judged
    results.parts.unet = Part("ok", data=_unet({
        # paired ratios decide when there are pairs; medians otherwise
        "graph_fused": Ratio("graph_masked_fused", "graph_unmasked", 1.2, 1.1, 1.025),
        "graph_flex": Ratio("graph_masked_flex", "graph_unmasked", 1.01, 1.0, 1.04),
        "graph_op": Ratio("graph_masked_op", "graph_unmasked", 1.0, 1.0, 1.0),  # not a candidate
        "compile_fused": Ratio("compile_masked_fused", "compile_unmasked", 1.05, 1.04),
        "compile_ro_fused": Ratio("compile_ro_masked_fused", "compile_ro_unmasked", 1.0, 1.0),
    }))  # fmt: skip
    timing = CallTiming(10.0, 9.0, 3, 20, "cuda-graph")

    def shape(triton: float) -> AttentionShape:
        row = AttentionShape([2, 20, 1024, 77, 64], "float16", 0.3)
        row.impls = {"sdpa": ImplResult("ok", timing=timing),
                     "triton": ImplResult("ok", timing=timing, correct=True, ratio_vs_sdpa=triton),
                     "flex": ImplResult("failed", error="RuntimeError: no")}  # fmt: skip
        return row

    results.parts.attention = Part("ok", data=AttentionData("m", [shape(1.1), shape(1.2)]))
    flips = GateFlips("fp16", 1000, 0, 0, 3, 0.0, 0.05, {"a": 0})
    results.parts.gate_head = Part("ok", data=GateHeadData("sdxl", 50, 2, flips))
    v = verdict(results)
    t = v.targets
    assert (t["unet_graph"].measured, t["unet_graph"].met) == (1.025, True)
    assert "best fused" in t["unet_graph"].detail and "op 1.000" in t["unet_graph"].detail
    assert (t["unet_compile"].measured, t["unet_compile"].met) == (1.05, False)  # median
    assert t["unet_compile_ro"].measured == 1.0 and t["unet_compile_ro"].met is True
    assert (t["attention_triton"].measured, t["attention_triton"].met) == (1.2, False)
    assert t["attention_flex"].measured is None and t["attention_flex"].met is None
    assert (t["gate_head_flips"].measured, t["gate_head_flips"].met) == (0, True)
    assert t["kernel_copy_fraction"].met is None  # not measured
    # A failed implementation is listed and makes the run not ok; correctness stands.
    assert v.failed == ["attention.[2, 20, 1024, 77, 64].flex"] * 2 and v.ok is False
    assert v.attention_correct is True


@pytest.mark.gpu
def test_captured_graph_replays_into_its_output() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the graph helper captures CUDA work")
    from maskattn_deploy.cuda_graphs import capture

    x = torch.ones(1024, device="cuda")
    calls = []

    def step() -> torch.Tensor:
        calls.append(1)
        return x * 2

    graph = capture(step, warmup=2)
    assert len(calls) == 3  # two warm-ups and the captured call; replays run no Python
    x.fill_(3.0)
    out = graph.replay()
    assert out is graph.output and torch.equal(out.cpu(), torch.full((1024,), 6.0))
    assert len(calls) == 3
