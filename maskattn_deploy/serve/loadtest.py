"""``maskattn-deploy loadtest``: closed-loop load on a served pipeline.

``concurrency`` client threads (one connection each) send requests back to back until
``requests`` have been sent; each request has its own seed, so no two are alike. Reported per
concurrency level: throughput (answered requests per second of wall time), latency percentiles
of the answered requests, errors by kind, and the batch sizes the server actually executed,
read from Triton's statistics (executions per batch size) and Prometheus metrics
(``nv_inference_count / nv_inference_exec_count``) before and after the level.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from maskattn_deploy.serve.client import Request, ServeError, as_serve_error, connect, generate
from maskattn_deploy.serve.protocol import MODEL_NAME


@dataclass
class LoadOptions:
    url: str = "127.0.0.1:8000"
    protocol: str = "http"
    metrics_url: str | None = None  # default: the HTTP host, port 8002
    concurrency: tuple[int, ...] = (1, 8)
    requests: int = 32  # per concurrency level
    prompt: str = "a red square left of a green circle"
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    timeout_s: float = 600.0


@dataclass
class LevelReport:
    """One concurrency level."""

    concurrency: int
    requests: int
    answered: int
    seconds: float
    throughput_rps: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    batch_sizes: dict[int, int]  # executed batch size -> executions (Triton statistics)
    mean_batch: float | None  # nv_inference_count / nv_inference_exec_count over the level
    first_error: str | None = None


@dataclass
class LoadReport:
    url: str
    levels: list[LevelReport] = field(default_factory=list)

    def speedup(self) -> float | None:
        """Throughput of the highest concurrency over the lowest."""
        if len(self.levels) < 2 or not self.levels[0].throughput_rps:
            return None
        return self.levels[-1].throughput_rps / self.levels[0].throughput_rps

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "levels": [asdict(x) for x in self.levels],
            "speedup": self.speedup(),
        }

    def table(self) -> str:
        head = f"{'conc':>4} {'req':>4} {'ok':>4} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}  batch sizes (executions)"
        rows = [head]
        for x in self.levels:
            sizes = ", ".join(f"{k}: {v}" for k, v in sorted(x.batch_sizes.items())) or "-"
            mean = f" (mean {x.mean_batch:.2f})" if x.mean_batch else ""
            rows.append(
                f"{x.concurrency:>4} {x.requests:>4} {x.answered:>4} {x.throughput_rps:>7.3f} "
                f"{x.latency_ms.get('p50', 0):>8.0f} {x.latency_ms.get('p95', 0):>8.0f} "
                f"{x.latency_ms.get('p99', 0):>8.0f} {sum(x.errors.values()):>6}  {sizes}{mean}"
            )
        if self.speedup() is not None:
            rows.append(
                f"throughput at concurrency {self.levels[-1].concurrency} / concurrency "
                f"{self.levels[0].concurrency}: {self.speedup():.2f}x"
            )
        return "\n".join(rows)


def run_loadtest(options: LoadOptions) -> LoadReport:
    """Run every concurrency level in turn against one server."""
    report = LoadReport(options.url)
    probe = connect(options.url, options.protocol, options.timeout_s)
    try:
        if not probe.is_server_ready():
            raise ServeError(f"the server at {options.url} is not ready", "unreachable")
    except ServeError:
        raise
    except Exception as exc:  # noqa: BLE001 - connection errors of either protocol
        raise as_serve_error(exc, probe) from None
    try:
        seed = options.seed
        for level in options.concurrency:
            report.levels.append(_level(options, level, seed, probe))
            seed += options.requests
    finally:
        probe.close()
    return report


def _level(options: LoadOptions, concurrency: int, seed: int, probe: Any) -> LevelReport:
    before = batch_statistics(probe), _counts(options)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    first_error: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(options.requests))

    def worker() -> None:
        client = connect(options.url, options.protocol, options.timeout_s)
        try:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                request = Request(
                    options.prompt,
                    seed=seed + index,
                    steps=options.steps,
                    guidance=options.guidance,
                    height=options.height,
                    width=options.width,
                )
                try:
                    served = generate(client, request, outputs=("SETTINGS",))
                except ServeError as exc:
                    with lock:
                        errors[exc.kind] += 1
                        first_error[:1] = first_error[:1] or [str(exc)]
                    continue
                with lock:
                    latencies.append(served.latency_s)
        finally:
            client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    after = batch_statistics(probe), _counts(options)
    sizes = {k: v - before[0].get(k, 0) for k, v in after[0].items() if v - before[0].get(k, 0)}
    mean = None
    if after[1] and before[1] and after[1][1] > before[1][1]:
        mean = (after[1][0] - before[1][0]) / (after[1][1] - before[1][1])
    return LevelReport(
        concurrency=concurrency,
        requests=options.requests,
        answered=len(latencies),
        seconds=round(seconds, 3),
        throughput_rps=len(latencies) / seconds if seconds else 0.0,
        latency_ms=percentiles(latencies),
        errors=dict(errors),
        batch_sizes=sizes,
        mean_batch=mean,
        first_error=first_error[0] if first_error else None,
    )


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50/p95/p99 and mean in milliseconds (linear interpolation, numpy's default)."""
    if not latencies:
        return {}
    ms = np.asarray(latencies) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
    }


def batch_statistics(client: Any) -> dict[int, int]:
    """Executions per batch size of the served model so far (Triton's statistics extension)."""
    stats = client.get_inference_statistics(MODEL_NAME)
    if not isinstance(stats, dict):  # gRPC returns a protobuf message
        from google.protobuf.json_format import MessageToDict

        stats = MessageToDict(stats, preserving_proto_field_name=True)
    sizes: dict[int, int] = {}
    for model in stats.get("model_stats", []):
        for entry in model.get("batch_stats", []):
            sizes[int(entry["batch_size"])] = int(entry["compute_infer"]["count"])
    return sizes


def _counts(options: LoadOptions) -> tuple[float, float] | None:
    """(nv_inference_count, nv_inference_exec_count) from the Prometheus endpoint."""
    url = options.metrics_url or _default_metrics_url(options.url)
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values = {}
    for line in text.splitlines():
        for name in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(name + "{") and f'model="{MODEL_NAME}"' in line:
                values[name] = float(line.rsplit(" ", 1)[1])
    if len(values) != 2:
        return None
    return values["nv_inference_count"], values["nv_inference_exec_count"]


def _default_metrics_url(url: str) -> str:
    host = url.split("://")[-1].rsplit(":", 1)[0]
    return f"http://{host}:8002/metrics"
