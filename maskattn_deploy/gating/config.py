"""Gate placement configuration: which ``attn2`` layers get gates, and how heads are shared."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from maskattn_deploy.checks import check_int, is_number
from maskattn_deploy.errors import InvalidValueError
from maskattn_deploy.ops.contract import DEFAULT_THRESHOLD

Stage = Literal["high", "mid", "low", "all"]
Placement = Literal["encoder", "decoder", "both"]

STAGES: tuple[str, ...] = ("high", "mid", "low", "all")
PLACEMENTS: tuple[str, ...] = ("encoder", "decoder", "both")


@dataclass(frozen=True)
class GateConfig:
    """How gates are placed and computed.

    stage: ``high`` = the highest-resolution cross-attention level (SDXL: down_blocks.1 /
    up_blocks.1), ``mid`` = the other down/up cross-attention levels (SDXL: down_blocks.2 /
    up_blocks.0, the published default), ``low`` = the UNet mid block, ``all`` = every one.
    placement: ``encoder`` (down path), ``decoder`` (up path) or ``both`` (down, up and mid block).
    share_heads: one gate head per (stage, width) instead of one per layer.
    threshold: on the gate logit g (0.0 is sigmoid(g) > 0.5).
    """

    stage: Stage = "mid"
    placement: Placement = "both"
    share_heads: bool = True
    hidden_dim: int = 128
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(
                f"unknown placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}"
            )
        check_int("hidden_dim", self.hidden_dim, low=1)
        if not isinstance(self.share_heads, bool):
            raise InvalidValueError(f"share_heads must be True or False, got {self.share_heads!r}")
        if not is_number(self.threshold) or math.isnan(self.threshold):
            raise InvalidValueError(
                f"threshold must be a number (a gate logit; +-inf allowed), got {self.threshold!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GateConfig:
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        return cls(**known)
