"""The run folder: checked before anything is written, then claimed for one run at a time.

:func:`check_run_dir` refuses what cannot work (a file in the way, a finished run without
``--resume``, settings a resume would change) before the model is loaded; :func:`claim_run_dir`
then locks the folder, removes temp files of killed runs and records the settings in
``OUT/config.json``, so ``--resume`` can refuse settings that would change the numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.train.checkpoint import CHECKPOINTS_DIR, latest_checkpoint
from maskattn_deploy.train.config import TrainConfig, config_from_dict, diff_configs
from maskattn_deploy.train.dist import Runtime
from maskattn_deploy.utils import write_json_atomic

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GATES_DIR = "gates"
# Settings that may change when a run is resumed (they do not affect the numbers).
RESUME_MUTABLE = ("log", "data.num_workers", "description")


def check_run_dir(out_dir: Path, config: TrainConfig, resume: bool) -> Path | None:
    """Check the run folder (nothing is written); returns the checkpoint to resume from."""
    config_path = out_dir / CONFIG_NAME
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; choose a folder for the run")
    latest = latest_checkpoint(out_dir)
    if resume and latest is not None:
        _check_resumable(out_dir, config)
        logger.info("resuming from %s", latest)
        return latest
    if resume:
        logger.warning("no checkpoint in %s: starting a new run", out_dir)
    elif config_path.exists() or latest is not None:
        raise UserError(
            f"{out_dir} already holds a training run: pass --resume to continue it, "
            "or choose another --out"
        )
    return None


def claim_run_dir(
    out_dir: Path,
    config: TrainConfig,
    runtime: Runtime,
    resume_from: Path | None,
    stack: contextlib.ExitStack,
) -> None:
    """Lock the run folder (released by ``stack``), remove temp files of killed runs, record
    the settings of a new run."""
    from maskattn_deploy.locks import output_lock, remove_stale_temps

    runtime.barrier()  # every process has checked before the main one writes
    if runtime.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {out_dir}: {exc.strerror}") from exc
        stack.enter_context(output_lock(out_dir))
        for folder in (out_dir, out_dir / CHECKPOINTS_DIR, out_dir / GATES_DIR):
            remove_stale_temps(folder)
        if resume_from is None:
            write_json_atomic(out_dir / CONFIG_NAME, {"config": config.to_dict(), **_versions()})
    runtime.barrier()


def _check_resumable(out_dir: Path, config: TrainConfig) -> None:
    config_path = out_dir / CONFIG_NAME
    try:
        saved = config_from_dict(json.loads(config_path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"cannot resume: {config_path} is missing or unreadable ({exc}); it records "
            "the run's settings"
        ) from exc
    changes = diff_configs(saved, config, ignore=RESUME_MUTABLE)
    if changes:
        raise UserError(
            f"--resume needs the settings of the run in {out_dir}; changed: "
            f"{'; '.join(changes)}. Start a new run with gates.init={out_dir / GATES_DIR} "
            "to continue these gates under new settings"
        )


def _versions() -> dict[str, Any]:
    import diffusers

    import maskattn_deploy

    return {
        "versions": {
            "maskattn_deploy": getattr(maskattn_deploy, "__version__", "unknown"),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        }
    }
