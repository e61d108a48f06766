"""What the parts of a run share: the recorder that saves after every step, and the context."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.bench.gpu_check.plan import Budget, CheckConfig, Plan
from maskattn_deploy.bench.gpu_check.results import CheckResults, Part, to_json
from maskattn_deploy.bench.gpu_check.timing import Timer
from maskattn_deploy.utils import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)
Echo = Callable[[str], None]


class Recorder:
    """Holds the results and rewrites results.json / results.md after every step."""

    def __init__(
        self, out_dir: Path, results: CheckResults, echo: Echo,
        render: Callable[[CheckResults], str],
    ) -> None:  # fmt: skip
        self.out_dir = out_dir
        self.results = results
        self.echo = echo
        self.render = render  # results -> results.md

    def save(self) -> None:
        write_json_atomic(self.out_dir / "results.json", to_json(self.results))
        with atomic_path(self.out_dir / "results.md") as tmp:
            tmp.write_text(self.render(self.results))

    def run_part(
        self, name: str, fn: Callable[[Part[Any]], None], budget: Budget, estimate_s: float
    ) -> Part[Any]:
        """Run one part unless the budget says no; failures are recorded, never raised."""
        part: Part[Any] = Part()
        setattr(self.results.parts, name, part)
        reason = budget.skip_reason(name, estimate_s)
        if reason is not None:
            part.status, part.reason = "skipped", reason
            self.echo(f"[{name}] skipped: {reason}")
            self.save()
            return part
        self.echo(f"[{name}] start at {budget.elapsed():.1f} s")
        start = time.perf_counter()
        try:
            fn(part)
            if part.status == "running":
                part.status = "ok"
        except Exception as exc:  # a broken part must not cost the later parts
            part.status, part.error = "failed", f"{type(exc).__name__}: {exc}"
            part.traceback = traceback.format_exc()[-4000:]
            logger.debug("part %s failed", name, exc_info=True)
        except BaseException as exc:  # SIGTERM (timeout) or Ctrl-C: save what there is, stop
            part.status, part.error = "interrupted", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            part.elapsed_s = round(time.perf_counter() - start, 3)
            self.save()
        tail = f": {part.note}" if part.status != "ok" else ""
        self.echo(
            f"[{name}] {part.status} in {part.elapsed_s:.1f} s "
            f"(total {budget.elapsed():.1f} s of {budget.total_s:.0f} s){tail}"
        )
        return part


@dataclass
class RunContext:
    """Everything the parts share."""

    config: CheckConfig
    plan: Plan
    device: torch.device
    budget: Budget
    recorder: Recorder
    timer: Timer
    echo: Echo
    kernel: Any = None
    kernel_missing: str | None = None
    kernel_path: str = ""
    compiles_s: list[float] = field(default_factory=list)  # first (compiling) calls so far
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # last output per variant
    model: Any = None  # the UNet the gate_head and unet parts share (model.Model)

    def l2_bytes(self) -> int:
        if self.device.type != "cuda":
            return 0
        props = torch.cuda.get_device_properties(self.device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)

    def save(self) -> None:
        self.recorder.save()
