"""How installed gates behave: a typed, immutable :class:`GateMode` set with ``gates.mode(...)``.

The mode is read by every gated processor on each forward, so it is one frozen value held by
the :class:`~maskattn_deploy.gating.gateset.GateSet` and changed only through its context
manager, which restores the previous mode on exit::

    with gates.mode(attention=AttentionImpl.OP):         # explicit probabilities, custom op
        unet(...)
    with gates.mode(GateMode.for_training("relaxed")):   # straight-through training
        loss = unet(...).sample.square().mean()

torch.compile reads the mode's fields like any other attribute (it guards on them and
recompiles when they change), so a mode never costs a graph break.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

_E = TypeVar("_E", bound=Enum)


class AttentionImpl(str, Enum):
    """How a gated layer computes its masked attention at inference.

    ``AUTO``: ``SDPA`` on the CPU, ``FUSED`` on CUDA. ``SDPA``: the open set as a -inf bias to
    PyTorch's fused attention (fast eager path). ``OP``: explicit probabilities through the
    ``maskattn::masked_softmax`` custom op (one node in the ONNX export, the Triton kernel on
    CUDA). ``FUSED``: ``scale * q k^T -> masked softmax -> p v`` in one
    ``maskattn::gated_attention`` call (the fused Triton kernel on CUDA, the explicit reference
    path elsewhere). ``FLEX``: the same op with PyTorch's FlexAttention (compiled on CUDA).
    ``REFERENCE``: explicit probabilities through the oracle, never a kernel (to measure what
    the kernels change). Exports trace ``FUSED`` as one ``MaskedCrossAttention`` node per gated
    layer and everything else as ``OP``; training has its own path.
    """

    AUTO = "auto"
    SDPA = "sdpa"
    OP = "op"
    FUSED = "fused"
    FLEX = "flex"
    REFERENCE = "reference"


class Estimator(str, Enum):
    """How the gate gradient is estimated in training (the forward is the hard mask in both).

    ``BIAS``: ``-1e4 * (1 - STE gate)`` added to the logits, as in the authors'
    implementation; a closed token's probability is exactly 0, so its gate gets no gradient of
    its own. ``RELAXED``: the gradient of ``softmax(s + log sigmoid(g - threshold))``; closed
    tokens keep a gradient bounded by their relaxed probability, so gates can learn to reopen.
    """

    BIAS = "bias"
    RELAXED = "relaxed"


class HeadPrecision(str, Enum):
    """Precision of the gate head's latent MLP (the text MLP and the logits are always fp32).

    ``FP32``: the latent tokens are copied to fp32 first (the default). ``ACTIVATION``: the MLP
    runs in the activation dtype (fp16/bf16 UNets), which saves the fp32 copy of the whole
    activation; LayerNorm keeps its statistics in fp32 inside PyTorch's kernel, and the MLP's
    output is cast to fp32 before the logits. It can flip gates whose logit sits near the
    threshold: measure with ``maskattn-deploy bench --gate-head`` before using it. Identical to
    ``FP32`` on fp32 activations.
    """

    FP32 = "fp32"
    ACTIVATION = "activation"


def _coerce(enum: type[_E], value: object, what: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise ValueError(f"unknown {what} {value!r}; choose {choices}") from None


@dataclass(frozen=True)
class GateMode:
    """Everything about how the gates run, as one immutable value.

    attention: the inference attention path (:class:`AttentionImpl`).
    training: straight-through training (hard mask forward, ``estimator`` gradients for the
        gates) instead of the exact inference path.
    estimator: the training gradient (:class:`Estimator`).
    observing: keep each layer's open mask of the last forward (``GateSet.open_fractions``).
    latent_precision: the latent MLP's precision (:class:`HeadPrecision`).
    text_cache: compute each shared head's text MLP once per UNet forward instead of once per
        layer (same numbers bit for bit; off only to measure what it saves).
    """

    attention: AttentionImpl = AttentionImpl.AUTO
    training: bool = False
    estimator: Estimator = Estimator.BIAS
    observing: bool = False
    latent_precision: HeadPrecision = HeadPrecision.FP32
    text_cache: bool = True

    def __post_init__(self) -> None:
        # Strings are accepted where enums are expected (recipes and flags hold strings).
        set_ = object.__setattr__
        set_(self, "attention", _coerce(AttentionImpl, self.attention, "attention implementation"))
        set_(self, "estimator", _coerce(Estimator, self.estimator, "gate estimator"))
        set_(
            self,
            "latent_precision",
            _coerce(HeadPrecision, self.latent_precision, "latent head precision"),
        )
        for name in ("training", "observing", "text_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GateMode.{name} must be a bool, got {getattr(self, name)!r}")

    @classmethod
    def for_training(cls, estimator: Estimator | str = Estimator.BIAS) -> GateMode:
        """Straight-through training with ``estimator``, observing the open masks."""
        return cls(training=True, estimator=estimator, observing=True)  # type: ignore[arg-type]

    def replace(self, **changes: object) -> GateMode:
        """A copy with ``changes`` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


ESTIMATORS: tuple[str, ...] = tuple(member.value for member in Estimator)
