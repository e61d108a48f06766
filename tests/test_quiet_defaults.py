"""Normal runs print the command's own progress, not library chatter; default outputs of a
rehearsal stay out of the source checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHATTER = (
    "accelerate",  # diffusers: "... install accelerate ..."
    "Loading pipeline components",  # diffusers' progress bar per pipeline load
    "Loading weights",  # transformers' progress bar per text encoder
    "torchvision",  # transformers: image processors without torchvision
    "FutureWarning",
    "DeprecationWarning",
)


def test_dry_run_default_output_is_outside_the_checkout(monkeypatch, tmp_path: Path) -> None:
    from maskattn_deploy.bench.gpu_check.run import default_out_dir

    monkeypatch.setenv("MASKATTN_DEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)  # where a developer runs it
    out = default_out_dir(dry_run=True)
    assert out.is_absolute() and out.is_relative_to(tmp_path / "cache")
    assert not out.is_relative_to(ROOT)


def test_loading_without_accelerate_prints_nothing(monkeypatch, capfd) -> None:
    """diffusers warns "install accelerate" on each load unless told not to try it."""
    import diffusers.models.modeling_utils as modeling_utils
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    import maskattn_deploy._lazy as lazy
    from maskattn_deploy.models import load_pipeline

    for module in (pipeline_utils, modeling_utils):
        monkeypatch.setattr(module, "is_accelerate_available", lambda: False)
    real = lazy.available
    monkeypatch.setattr(
        lazy, "available", lambda name: False if name == "accelerate" else real(name)
    )
    capfd.readouterr()
    load_pipeline("tiny")
    captured = capfd.readouterr()
    # Import-time notes are the CLI's business (see the next test); a load prints nothing.
    noise = [c for c in CHATTER[:3] if c in captured.err + captured.out]
    assert not noise, captured.err


@pytest.mark.slow
def test_generate_prints_its_own_lines_only(tmp_path: Path) -> None:
    """A fresh process (library verbosity is read at import): no library notes or bars."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        env.pop(name, None)
    args = ["generate", "a red cube", "--backend", "torch", "--steps", "1", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "maskattn_deploy.cli.main", *args, "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    noise = [c for c in CHATTER if c in proc.stderr + proc.stdout]
    assert not noise, proc.stderr
    assert "wrote " in proc.stdout
