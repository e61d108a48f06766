#!/usr/bin/env python
"""Benchmark a local server: start ``maskattn-deploy serve``, run ``loadtest`` levels, stop it.

    python scripts/serve_loadtest.py [--serve-args "EXPORT_DIR --instances 2 --threads 1 ..."]
        [--concurrency 1,8] [--requests 24] [--steps 8] [--height 128] [--width 128]
        [--json out.json]

The server runs with free ports on loopback; every concurrency level runs against the same
server, one after the other, so their throughputs compare within one run. Prints the loadtest
table (throughput, p50/p95/p99 latency, errors, executed batch sizes), the throughput ratio of
the last level to the first, the machine and serve's exit code after SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import tempfile
import time
from pathlib import Path

from maskattn_deploy.serve.loadtest import LoadOptions, run_loadtest
from maskattn_deploy.serve.spawn import spawn_serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-args", default="--instances 2 --threads 1 --quiet")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--warmup-requests", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    log = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "serve.log"
    served = spawn_serve(shlex.split(args.serve_args), log)
    try:
        common = dict(
            url=served.http,
            metrics_url=served.metrics,
            steps=args.steps,
            guidance=args.guidance,
            height=args.height,
            width=args.width,
        )
        run_loadtest(
            LoadOptions(concurrency=(1,), requests=args.warmup_requests, seed=10**6, **common)
        )
        levels = tuple(int(x) for x in args.concurrency.split(","))
        start = time.time()
        report = run_loadtest(LoadOptions(concurrency=levels, requests=args.requests, **common))
    finally:
        code = served.stop()
    machine = (
        f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"
    )
    print(report.table())
    print(f"machine: {machine}; serve {args.serve_args!r}; serve exit code after SIGTERM: {code}")
    if args.json is not None:
        data = {
            **report.as_json(),
            "machine": machine,
            "serve_args": args.serve_args,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
            "serve_exit_code": code,
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
