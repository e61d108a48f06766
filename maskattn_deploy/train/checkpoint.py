"""Training-state checkpoints: everything needed to continue a run bit for bit.

Layout inside the run folder::

    OUT/checkpoints/step-0000500/
        gates.safetensors, gates.json   the gates (core gate format, loadable by load_gates)
        train_state.pt                  optimizer, LR schedule, grad scaler, step, RNG states
                                        (python, numpy, torch CPU/CUDA, the run's noise
                                        generator per process), data position per process,
                                        skipped records

Each checkpoint folder is written to a temporary name and renamed into place, so a crash
never leaves a half-written checkpoint that looks complete. ``train_state.pt`` holds only
tensors and plain containers and is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskattn_deploy.errors import CheckpointError
from maskattn_deploy.utils import atomic_dir, load_weights_only

logger = logging.getLogger(__name__)

STATE_FORMAT = "maskattn-deploy-train-state/1"
STATE_NAME = "train_state.pt"
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states of this process in weights-only-loadable form."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete training checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / STATE_NAME).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    save_gates_fn: Any,
    keep: int = 3,
) -> Path:
    """Write ``checkpoints/step-N`` atomically (gates via ``save_gates_fn(folder)``), prune old.

    Only the main process calls this. ``keep`` newest checkpoints survive.
    """
    target = Path(run_dir) / CHECKPOINTS_DIR / step_dir_name(step)
    with atomic_dir(target, overwrite=True) as tmp:
        save_gates_fn(tmp)
        torch.save({"format": STATE_FORMAT, "step": step, **state}, tmp / STATE_NAME)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint written: %s", target)
    return target


def read_train_state(folder: str | Path) -> dict[str, Any]:
    """Load ``train_state.pt`` safely (weights only); a bad file raises CheckpointError."""
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a training checkpoint (no {STATE_NAME})")
    try:
        state = load_weights_only(path, CheckpointError, "a training state")
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}; delete this checkpoint folder to resume from the previous one"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a {STATE_FORMAT} file")
    return state


def load_gate_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The gate tensors of a checkpoint folder, exactly as saved (safetensors)."""
    from maskattn_deploy.gating.checkpoint import read_checkpoint

    return read_checkpoint(folder).state_dict
