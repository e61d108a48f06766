"""What a training run reports: metrics lines while it runs, a :class:`TrainResult` at the end.

``OUT/metrics.jsonl`` gets one JSON object per line (``start``, one per log interval, ``end``),
appended and flushed per line so a crashed run keeps what it logged; TensorBoard event files go
to ``OUT/tensorboard`` when the package is installed. ``OUT/summary.json`` holds the result.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    out_dir: str
    gates_dir: str
    step: int
    total_steps: int
    complete: bool
    steps_this_run: int
    wall_s: float
    train_s: float
    steps_per_s: float
    images_per_s: float
    loss_first: float | None
    loss_last: float | None
    eval_loss_start: float | None
    eval_loss_end: float | None
    open_start: dict[str, float] = field(default_factory=dict)
    open_end: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    checkpoint: str | None = None
    device: str = "cpu"
    world: int = 1
    precision: str = "no"

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class MetricsWriter:
    """JSONL metrics in the run folder (appended; flushed per line), TensorBoard if installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_NAME
        self.tb = None
        if enabled and tensorboard:
            from maskattn_deploy._lazy import available

            if available("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            else:
                logger.info("tensorboard not installed: metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
            for stage, value in record.get("open", {}).items():
                self.tb.add_scalar(f"open/{stage}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
