"""Bench tables (terminal and Markdown) and the issue's targets, from known numbers."""

from __future__ import annotations

import torch

from maskattn_deploy.bench.config import BenchSetup
from maskattn_deploy.bench.memory import MemoryPeak
from maskattn_deploy.bench.report import bench_markdown, bench_text
from maskattn_deploy.bench.results import BenchResult, PipelineBench, UnetBench
from maskattn_deploy.bench.run import _targets
from maskattn_deploy.bench.timing import Stats
from maskattn_deploy.parity.inputs import ShapeCase


def _result() -> BenchResult:
    result = BenchResult("test machine", {"model": "tiny", "precision": "fp32", "repeats": 3})
    result.unet = [
        UnetBench("torch", "2x256x256", Stats((0.10, 0.12, 0.11)), Stats((0.09, 0.10, 0.10)), 1.1),
        UnetBench(
            "onnxruntime", "2x256x256", Stats((0.07, 0.08, 0.09)), Stats((0.07, 0.07, 0.08)), 1.2
        ),
    ]
    result.pipeline = [PipelineBench("onnxruntime", "2x256x256", 4, 1, Stats((0.5,)), 10, 80, 90)]
    result.memory = {"torch": MemoryPeak(600 * 2**20, "block")}
    result.backends = {"tensorrt": "skipped: TensorRT is not installed"}
    return result


def _setup() -> BenchSetup:
    return BenchSetup(
        "tiny", None, "fp32", torch.device("cpu"), None, None, [ShapeCase(2, 256, 256)]
    )


def test_targets_from_measurements() -> None:
    result = _result()
    _targets(result, _setup())
    by_name = {t.name: t for t in result.targets}
    ort = by_name["onnxruntime / torch eager UNet step (2x256x256)"]
    assert ort.value == 0.08 / 0.11 and ort.met  # medians: 80 ms vs 110 ms
    assert by_name["torch masked/unmasked UNet step (2x256x256)"].met  # 1.1 <= 1.15
    assert not by_name["onnxruntime masked/unmasked UNet step (2x256x256)"].met  # 1.2 > 1.15


def test_tables_show_numbers_skips_and_targets() -> None:
    result = _result()
    _targets(result, _setup())
    text = bench_text(result)
    assert "110.0 (100.0-120.0)" in text and "1.100" in text
    assert "SKIPPED tensorrt: TensorRT is not installed" in text
    md = bench_markdown(result)
    assert "| torch | 2x256x256 | 110.0 (100.0-120.0) | 100.0 (90.0-100.0) | 1.100 |" in md
    assert "| onnxruntime | 2x256x256 | 4 | 500.0 (500.0-500.0) | 2.000 |" in md
    assert "| torch | 600 (block) |" in md
    assert "**missed**" in md and "- tensorrt: TensorRT is not installed" in md
