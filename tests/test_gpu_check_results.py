"""The GPU check's typed results: the JSON rules of ``results.json`` and the CUDA-graph helper."""

from __future__ import annotations

import pytest
import torch

from maskattn_deploy.bench.gpu_check.plan import CheckConfig
from maskattn_deploy.bench.gpu_check.report import render_markdown, verdict
from maskattn_deploy.bench.gpu_check.results import (
    CallTiming,
    CaseResult,
    CopyCeiling,
    Environment,
    Part,
    Ratio,
    StepTiming,
    Variant,
    VariantResult,
    to_json,
)
from maskattn_deploy.bench.gpu_check.run import new_results


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
    text = render_markdown(results)
    assert "| kernel | skipped |" in text and "| unet | not reached | - |  |" in text


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
