#!/usr/bin/env python
"""Measure the ONNX export of the full-size SDXL UNet: wall/CPU time and peak memory.

    python scripts/export_sdxl_unet_measure.py [--out DIR] [--keep] [--ort-check]

The UNet is SDXL base's architecture (the config written out in
``maskattn_deploy.bench.sdxl_config``, no download) with random fp16 weights and seeded ``mid``
gates (down_blocks.2 / up_blocks.0, the published default), exported through the same code as
``maskattn-deploy export --fp16`` (``export_unet``, recipe ``sdxl-1024``): fp16 graph, gate heads
fp32, one custom node per gated layer, weights in ``model.onnx.data``. Then the ONNX checker
(path-based full check), shape inference, the fp32-island and gate-coverage checks run on the
written file. ``--ort-check`` also opens an ONNX Runtime CPU session (ORT keeps fp32 copies of
weights it has no fp16 kernel for: about 3x the file in memory) and runs one 512x512 step.

Prints one JSON object: machine, date, per-phase seconds, peak RSS, file sizes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

GIB = 1024**3


class RssSampler:
    """Peak resident memory per phase (sampled every 50 ms; ru_maxrss gives the process peak)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def take_peak(self) -> int:
        peak, self._peak = max(self._peak, self._proc.memory_info().rss), 0
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def phase(name: str, report: dict[str, Any], rss: RssSampler) -> Iterator[None]:
    print(f"[{dt.datetime.now():%H:%M:%S}] {name} ...", file=sys.stderr, flush=True)
    rss.take_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    report["phases"][name] = {
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "peak_rss_gib": round(rss.take_peak() / GIB, 2),
    }
    print(f"    {name}: {report['phases'][name]}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    import psutil

    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "available_gib_at_start": round(psutil.virtual_memory().available / GIB, 1),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }


def build_unet() -> torch.nn.Module:
    """SDXL base UNet, random weights created directly in fp16 (5.1 GB instead of 10.3 GB)."""
    from diffusers import UNet2DConditionModel

    from maskattn_deploy.bench.sdxl_config import SDXL_UNET_PARAMETERS, sdxl_unet_config

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        unet = UNet2DConditionModel(**sdxl_unet_config()).eval()
    finally:
        torch.set_default_dtype(previous)
    count = sum(p.numel() for p in unet.parameters())
    if count != SDXL_UNET_PARAMETERS:
        raise SystemExit(f"not the SDXL UNet: {count} parameters != {SDXL_UNET_PARAMETERS}")
    return unet


def install_mid_gates(unet: torch.nn.Module) -> list[str]:
    from maskattn_deploy.gating import GateConfig, install_gates

    torch.manual_seed(1)
    gates = install_gates(unet, GateConfig(stage="mid"))  # fp32 heads
    return list(gates.layers)


def check_written(path: Path, layers: list[str]) -> dict[str, Any]:
    from maskattn_deploy.export import graph
    from maskattn_deploy.export.validate import check_file

    inferred = check_file(path)  # onnx.checker full check on the path + shape inference
    graph.check_gate_coverage(
        graph.gated_layers_in(inferred), layers, graph.standard_softmax_layers(inferred)
    )
    stray = graph.fp32_outside_islands(inferred, "unet")
    return {"custom_nodes": len(graph.gated_layers_in(inferred)), "fp32_outside_islands": stray}


def ort_check(path: Path) -> dict[str, Any]:
    import numpy as np

    from maskattn_deploy.export.validate import ort_session

    session = ort_session(path)
    gen = np.random.default_rng(0)
    feed = {
        "sample": gen.standard_normal((1, 4, 64, 64)).astype(np.float16),
        "timestep": np.array([500.0], dtype=np.float32),
        "encoder_hidden_states": gen.standard_normal((1, 77, 2048)).astype(np.float16),
        "text_embeds": gen.standard_normal((1, 1280)).astype(np.float16),
        "time_ids": np.array([[512, 512, 0, 0, 512, 512]], dtype=np.float32),
    }
    start = time.perf_counter()
    (out,) = session.run(["out_sample"], feed)
    return {
        "run_512px_s": round(time.perf_counter() - start, 1),
        "finite": bool(np.isfinite(out).all()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the export folder")
    parser.add_argument("--ort-check", action="store_true", help="also run ONNX Runtime CPU")
    args = parser.parse_args(argv)

    from maskattn_deploy.export import export_unet

    scratch = Path(tempfile.mkdtemp(prefix="sdxl-unet-measure-"))
    out = args.out or scratch / "onnx"
    report: dict[str, Any] = {
        "what": "SDXL base UNet architecture, random fp16 weights, mid gates, fp16 ONNX graph",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "phases": {},
    }
    rss = RssSampler()
    start = time.perf_counter()
    try:
        with phase("build_unet_fp16", report, rss):
            unet = build_unet()
        with phase("install_gates", report, rss):
            layers = install_mid_gates(unet)
        with phase("export", report, rss):
            result = export_unet(
                unet,
                out,
                fp16=True,
                recipe="sdxl-1024",
                validate=False,  # no fp32 reference fits beside it; checks run below
                inplace=True,
                source="sdxl-base-architecture-random-weights",
                overwrite=True,
            )
        del unet
        with phase("check", report, rss):
            report["check"] = check_written(out / "unet" / "model.onnx", layers)
        if args.ort_check:
            with phase("onnxruntime", report, rss):
                report["onnxruntime"] = ort_check(out / "unet" / "model.onnx")
        files = {p.name: p.stat().st_size for p in (out / "unet").iterdir()}
        report["files_bytes"] = files
        report["external_data"] = result.components[0].external_data
        report["gated_layers"] = len(layers)
    finally:
        rss.stop()
        report["total_wall_s"] = round(time.perf_counter() - start, 1)
        report["total_cpu_s"] = round(time.process_time(), 1)
        report["peak_rss_gib"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2
        )
        report["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
            if args.out is not None:
                shutil.rmtree(args.out, ignore_errors=True)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
