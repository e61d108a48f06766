"""kill -9 at random points, and two runs on one output.

Each case runs the real console command in a child process and kills it (SIGKILL: no cleanup
code runs) at a point drawn from a seeded RNG: after a progress line it prints, or after a
random fraction of a full run's time. Afterwards every output is either complete and valid
(checked independently: the manifest's SHA-256 of every file, PNGs decoded, checkpoints
loaded) or absent, and the next ordinary run succeeds without any manual cleanup and leaves
no temp files or lock files behind.

The exports use ``--no-validate`` and the tiny model; generate uses the cached tiny export.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
CLI = [sys.executable, "-m", "maskattn_deploy.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def _kill_at(args: list[str], trigger: str | None, delay: float) -> bool:
    """Start ARGS, SIGKILL it ``delay`` s after a stdout line containing ``trigger`` (or after
    the start); True when it was killed before it ended on its own."""
    proc = subprocess.Popen(
        [*CLI, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    seen = threading.Event()
    if trigger is None:
        seen.set()

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if trigger is not None and trigger in line:
                seen.set()
        seen.set()  # ended without the line: kill at once (a no-op)

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    seen.wait(timeout=900)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid is gone, as after a crash
    reader.join(timeout=10)
    return killed


def _litter(folder: Path) -> list[str]:
    """Hidden temp/lock/old entries (ours end in .tmp, .partial, .lock or .old)."""
    suffixes = (".tmp", ".partial", ".lock", ".old")
    return sorted(str(p) for p in folder.rglob(".*") if p.name.endswith(suffixes))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_complete_export(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    files = manifest["files"]
    assert files and all(_sha256(folder / name) == digest for name, digest in files.items())
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert on_disk == set(files) | {"manifest.json"}, on_disk ^ (set(files) | {"manifest.json"})


# ------------------------------------------------------------------------------ export

EXPORT_POINTS = ("loading", "[1/4]", "[3/4] unet: exporting", "[4/4]", "exported", None)


def test_killed_exports_then_two_at_once(tmp_path: Path) -> None:
    """Kills leave nothing or a complete folder; the next export runs without cleanup, and a
    second export started meanwhile on the same folder is refused with the first one's pid.
    (One test, so the tiny model is exported completely only once.)"""
    out = tmp_path / "onnx"
    args = ["export", "--out", str(out), "--no-validate", "--overwrite"]
    for seed in SEEDS:
        rng = random.Random(seed)
        _kill_at(args, rng.choice(EXPORT_POINTS), rng.uniform(0.0, 3.0))
        if out.exists():
            assert_complete_export(out)
    first = subprocess.Popen(
        [*CLI, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert first.stdout is not None
    for line in first.stdout:  # it holds the folder's lock from here until it ends
        if "loading" in line:
            break
    second = _run(args)
    rest = first.stdout.read()
    assert first.wait() == 0, rest[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "Traceback" not in second.stderr
    assert str(out) in error and f"pid {first.pid}" in error
    assert_complete_export(out)
    assert _litter(tmp_path) == []  # the killed runs' temp folders and locks are gone


# ---------------------------------------------------------------------------- generate


def _images_are_complete(folder: Path) -> list[Path]:
    images = sorted(folder.glob("*.png"))
    for path in images:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated PNG fails here
            assert json.loads(image.text["maskattn-deploy"])["prompt"]
    return images


def test_killed_generate_leaves_only_complete_images(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "images"
    args = ["generate", "a red cube", "--export-dir", str(tiny_export), "--out", str(out)]
    args += ["--steps", "4", "--no-progress"]
    start = time.perf_counter()
    assert _run(args).returncode == 0
    full = time.perf_counter() - start
    for seed in SEEDS:
        _kill_at(args, None, random.Random(seed).uniform(0.2, 1.0) * full)
        if out.exists():
            _images_are_complete(out)
    done = _run(args)
    assert done.returncode == 0, done.stderr[-2000:]
    images = _images_are_complete(out)
    assert len(images) >= 2 and _litter(tmp_path) == []


def test_six_generates_into_one_folder_keep_six_images(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "images"
    args = ["generate", "a red cube", "--export-dir", str(tiny_export), "--out", str(out)]
    procs = [
        subprocess.Popen(
            [*CLI, *args, "--steps", "1", "--no-progress"],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-500:] for _, err in outputs]
    wrote = [line.split("wrote ", 1)[1] for out_, _ in outputs for line in out_.splitlines()
             if line.startswith("wrote ")]  # fmt: skip
    assert len(wrote) == 6 and len(set(wrote)) == 6  # every run names a different file
    assert sorted(str(p) for p in _images_are_complete(out)) == sorted(wrote)


# ------------------------------------------------------------------------------- train


def _assert_train_outputs_valid(run: Path) -> None:
    from maskattn_deploy.gating.checkpoint import read_checkpoint
    from maskattn_deploy.train.checkpoint import list_checkpoints, read_train_state

    if (run / "config.json").exists():
        assert "config" in json.loads((run / "config.json").read_text())
    for step, folder in list_checkpoints(run):
        assert read_train_state(folder)["step"] == step
        assert read_checkpoint(folder).step == step
    if (run / "gates").exists():
        assert read_checkpoint(run / "gates").step is not None


def test_killed_training_resumes_to_the_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = ["train.steps=6", "log.checkpoint_every=2", "log.eval_every=0"]
    settings += ["log.tensorboard=false", "log.progress=false"]
    args = ["train", "--recipe", "tiny-synthetic", *settings]
    start = time.perf_counter()
    assert _run([*args, "--out", str(tmp_path / "reference")]).returncode == 0
    full = time.perf_counter() - start
    for seed in SEEDS:
        _kill_at([*args, "--out", str(run), "--resume"], None, random.Random(seed).random() * full)
        _assert_train_outputs_valid(run)
    done = _run([*args, "--out", str(run), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_train_outputs_valid(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["complete"]
    assert _litter(tmp_path) == []
