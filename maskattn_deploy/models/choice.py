"""Which model and which gates: ``--model/--gates/--no-gates`` as one value, resolved once.

Every command that loads a model or an export (export, generate, parity, bench, demo) takes the
same three choices; :class:`ModelChoice` checks them together and picks the gate checkpoint:
the one given, none with ``no_gates``, the seeded (untrained) tiny gates for the built-in tiny
model, and for any other model an error that asks for a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maskattn_deploy.errors import UserError

TINY = "tiny"


@dataclass(frozen=True)
class ModelChoice:
    """``model`` (None: the caller's default), ``gates`` (a checkpoint), ``no_gates``."""

    model: str | None = None
    gates: Path | None = None
    no_gates: bool = False

    def __post_init__(self) -> None:
        if self.gates is not None and self.no_gates:
            raise UserError("pass either gates or no_gates, not both", params=("gates", "no_gates"))

    def model_or(self, default: str = TINY) -> str:
        return self.model or default

    def gate_checkpoint(
        self, model: str | None = None, say: Callable[[str], None] | None = None
    ) -> Path | None:
        """The gate checkpoint to use with ``model`` (default: the chosen one); None: ungated."""
        if self.no_gates:
            return None
        if self.gates is not None:
            return Path(self.gates)
        model = model if model is not None else self.model
        if model == TINY:
            from maskattn_deploy.models.tiny import tiny_default_gates_dir

            path = tiny_default_gates_dir()
            if say is not None:
                say(
                    f"note: no gate checkpoint given; using the seeded, untrained tiny gates in {path}"
                )
            return path
        raise UserError(
            f"no gate checkpoint for model {model}: pass gates (trained with maskattn-deploy "
            "train) or no_gates to run the plain model",
            params=("gates", "no_gates"),
        )
