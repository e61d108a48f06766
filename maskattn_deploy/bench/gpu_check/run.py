"""One GPU-check run from start to verdict: device, plan, budget, the parts in order, and the
dry run's interpreter child process.

``triton.jit`` picks interpretation when the kernel module is imported, so the dry run executes
in a child process started with ``TRITON_INTERPRET=1``; in that throwaway process the kernel is
also registered for CPU tensors, so the UNet's kernel path runs the interpreted kernel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.bench.gpu_check.attention import attention_part
from maskattn_deploy.bench.gpu_check.context import Echo, Recorder, RunContext
from maskattn_deploy.bench.gpu_check.gate_head import gate_head_part
from maskattn_deploy.bench.gpu_check.kernel import kernel_part, load_kernel
from maskattn_deploy.bench.gpu_check.plan import (
    BYTE_DEFINITION,
    SCHEMA,
    TARGET_ATTENTION_RATIO,
    TARGET_COPY_FRACTION,
    TARGET_GATE_FLIPS,
    TARGET_UNET_RATIO,
    Budget,
    CheckConfig,
)
from maskattn_deploy.bench.gpu_check.report import render_markdown, summary_text
from maskattn_deploy.bench.gpu_check.results import (
    CheckOutcome,
    CheckResults,
    CudaInfo,
    Environment,
    Part,
    TargetResult,
    Targets,
    Verdict,
)
from maskattn_deploy.bench.gpu_check.timing import Timer
from maskattn_deploy.bench.gpu_check.tuning import tuning_part
from maskattn_deploy.bench.gpu_check.unet import unet_part
from maskattn_deploy.bench.gpu_check.verdict import verdict
from maskattn_deploy.errors import BackendUnavailableError

CHILD_MODULE = "maskattn_deploy.bench.gpu_check"  # ``python -m`` runs its __main__


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def default_out_dir(dry_run: bool) -> Path:
    """``benchmarks/<UTC date>-<gpu name>`` for a GPU run, whose results are meant to be kept;
    the dry run (a CPU rehearsal) goes to ``<cache>/selftest/<date>-cpu-dry-run`` so it never
    leaves files in a source checkout."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    if dry_run:
        from maskattn_deploy.models.tiny import cache_root

        return cache_root() / "selftest" / f"{date}-cpu-dry-run"
    return Path("benchmarks") / f"{date}-{_slug(torch.cuda.get_device_name(0))}"


def new_results(config: CheckConfig) -> CheckResults:
    return CheckResults(
        schema=SCHEMA,
        dry_run=config.dry_run,
        plan=config.plan.name,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=config,
        targets=Targets(
            TARGET_COPY_FRACTION, TARGET_UNET_RATIO, TARGET_ATTENTION_RATIO, TARGET_GATE_FLIPS
        ),
        byte_definition=BYTE_DEFINITION,
    )


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=15, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout else None


def environment_info(device: torch.device) -> Environment:
    """Versions, host and (on CUDA) the card's properties."""
    import maskattn_deploy

    env = Environment(
        device=device.type,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        versions={
            "torch": torch.__version__,
            "triton": _version("triton"),
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "numpy": _version("numpy"),
            "maskattn_deploy": maskattn_deploy.__version__,
        },
        torch_cuda_build=torch.version.cuda,
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.cuda = CudaInfo(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_cache_bytes=getattr(props, "L2_cache_size", None),
            driver=_nvidia_driver(),
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def _environment_part(part: Part[Environment], device: torch.device) -> None:
    part.data = environment_info(device)


# --------------------------------------------------------------------------- orchestration


def _needs_interpreter_child(config: CheckConfig) -> bool:
    from maskattn_deploy._lazy import available

    return config.dry_run and os.environ.get("TRITON_INTERPRET") != "1" and available("triton")


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """``timeout`` sends SIGTERM: turn it into SystemExit so the last results get saved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _device(config: CheckConfig) -> torch.device:
    if config.dry_run:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    raise BackendUnavailableError(
        "no CUDA GPU is visible: run `maskattn-deploy selftest --dry-run` on a CPU "
        "machine, or run the GPU check on a machine with an NVIDIA GPU"
    )


# The parts after ``environment``, in run order (see plan.py for the budget of each).
PART_FUNCTIONS = {
    "kernel": kernel_part,
    "attention": attention_part,
    "gate_head": gate_head_part,
    "unet": unet_part,
    "tuning": tuning_part,
}


def run_check(config: CheckConfig, echo: Echo = print) -> CheckOutcome:
    """Run every part that fits the budget; the results are written to disk as they come."""
    if _needs_interpreter_child(config):
        return _run_in_interpreter_child(config, echo)
    device = _device(config)
    plan = config.plan
    if plan.cpu_threads:
        torch.set_num_threads(plan.cpu_threads)
    out = Path(config.out) if config.out else default_out_dir(config.dry_run)
    budget = Budget(config.budget_s)
    results = new_results(replace(config, out=str(out)))
    recorder = Recorder(out, results, echo, render_markdown)
    ctx = RunContext(config, plan, device, budget, recorder, Timer(device), echo)
    echo(f"GPU check ({plan.name}) -> {out} (budget {config.budget_s:.0f} s)")
    with _sigterm_as_exit():
        recorder.run_part("environment", lambda p: _environment_part(p, device), budget, 0)
        ctx.kernel, ctx.kernel_missing = load_kernel(device)
        for name, run in PART_FUNCTIONS.items():
            recorder.run_part(name, lambda p, run=run: run(p, ctx), budget, plan.estimate_s[name])
        results.verdict = verdict(results)
        results.complete, results.elapsed_s = True, round(budget.elapsed(), 2)
        recorder.save()
    echo(summary_text(results))
    return CheckOutcome(results.verdict.ok, out, results.verdict, results)


def _package_parent() -> Path:
    import maskattn_deploy

    return Path(maskattn_deploy.__file__).resolve().parent.parent


def _run_in_interpreter_child(config: CheckConfig, echo: Echo) -> CheckOutcome:
    """Run the dry run in ``python -m`` this package with TRITON_INTERPRET=1 from the start."""
    out = Path(config.out) if config.out else default_out_dir(True)
    child = replace(config, out=str(out.resolve()))
    paths = [str(_package_parent()), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }
    cmd = [sys.executable, "-m", CHILD_MODULE, json.dumps(asdict(child))]
    started = time.time()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(config.budget_s * 2 + 120, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line.rstrip("\n"))
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # the parent was interrupted: do not leave the child running
            proc.kill()
    path = out / "results.json"
    if not path.is_file() or path.stat().st_mtime < started - 1.0:  # none, or an old run's
        raise RuntimeError(f"the dry-run child process exited with {code} and wrote no {path}")
    written = json.loads(path.read_text()).get("verdict")
    found = None
    if written:
        targets = {k: TargetResult(**v) for k, v in written["targets"].items()}
        found = Verdict(**{**written, "targets": targets})
    return CheckOutcome(bool(found and found.ok), out, found, child_exit_code=code)


def child_main(argv: list[str]) -> int:
    """Entry of the interpreter child: ``python -m maskattn_deploy.bench.gpu_check CONFIG_JSON``."""
    import warnings

    warnings.filterwarnings("ignore")  # the interpreter's numpy warns on -inf - -inf lanes
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = CheckConfig(**json.loads(argv[0]))
    outcome = run_check(config, echo=lambda s: print(s, flush=True))
    return 0 if outcome.ok else 1
