"""``maskattn-deploy bench --gate-head``: what the gate heads cost, before and after, side by side.

On the torch UNet with its gates (the tiny model and its seeded gates by default), on the
parity check's UNet inputs (``parity.inputs.make_feed``, seed 0):

1. the gate heads of one UNet forward alone (each gated layer's recorded inputs through
   ``GateSet.gate_logits``) and the whole masked UNet step, each timed as interleaved pairs
   (A B, B A, ...; see :mod:`maskattn_deploy.bench.timing`):

   - ``per-layer`` (the text MLP in every layer, what the gates did before the per-forward
     cache) vs ``cached`` (once per shared head per forward, the default);
   - on fp16/bf16 activations also ``cached`` vs ``activation`` (the latent MLP in the
     activation dtype, :class:`~maskattn_deploy.gating.modes.HeadPrecision`);

2. gate flips of the activation-dtype latent MLP against the fp32 head, per dtype, on the same
   recorded layer inputs, counted with parity's gate-agreement tool and its fp16 margin
   (``parity.gates.gate_agreement``). The fp32 head stays the default unless these are 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maskattn_deploy.bench.timing import PairedStats, measure_interleaved
from maskattn_deploy.errors import UserError
from maskattn_deploy.gating import GateMode, GateSet, HeadPrecision
from maskattn_deploy.parity.inputs import ModelDims, ShapeCase, make_feed

Say = Callable[[str], None]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BEFORE = GateMode(text_cache=False)
CACHED = GateMode()
ACTIVATION = GateMode(latent_precision=HeadPrecision.ACTIVATION)


@dataclass
class GateHeadConfig:
    """What to measure (the CLI builds it from ``bench --gate-head`` flags)."""

    model: str = "tiny"
    gates: Path | None = None  # default: the tiny model's seeded gates
    case: ShapeCase = field(default_factory=lambda: ShapeCase(2, 256, 256))
    precision: str | None = None  # timing dtype; default fp16 on CUDA, fp32 on the CPU
    flip_dtypes: tuple[str, ...] = ("fp16", "bf16")
    repeats: int = 20
    warmup: int = 2
    seed: int = 0
    device: str | None = None


@dataclass
class Comparison:
    """One before/after pair, timed interleaved (``stats.a`` after, ``stats.b`` before)."""

    what: str  # "heads" (the gate heads of one forward) or "unet step"
    before: str
    after: str
    stats: PairedStats

    def line(self) -> str:
        after, before = self.stats.a.median * 1e3, self.stats.b.median * 1e3
        cpu = self.stats.cpu_ratio
        return (
            f"  {self.what:<9} {self.before:>9} {before:8.3f} ms  {self.after:>10} "
            f"{after:8.3f} ms  after/before {self.stats.ratio:.3f}"
            + (f" (CPU time {cpu:.3f})" if cpu is not None else "")
        )

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "before": self.before, "after": self.after,
                **self.stats.as_dict()}  # fmt: skip


@dataclass
class FlipCount:
    """Gate flips of the activation-dtype latent MLP vs the fp32 head on one dtype's UNet."""

    dtype: str
    entries: int
    flips: int
    tolerated: int
    near_threshold: int
    max_flip_distance: float
    margin: float
    per_layer: dict[str, int]

    def line(self) -> str:
        return (
            f"  {self.dtype} UNet: flips {self.flips}/{self.entries} "
            f"({self.flips / max(self.entries, 1):.4%}), within the parity margin "
            f"|g-thr| <= {self.margin:g}: {self.tolerated}, reference gates that near the "
            f"threshold: {self.near_threshold}, largest flipped |g-thr| "
            f"{self.max_flip_distance:.3g}"
        )


@dataclass
class GateHeadResult:
    model: str
    device: str
    precision: str
    case: str
    layers: int
    heads: int
    repeats: int
    comparisons: list[Comparison] = field(default_factory=list)
    flips: list[FlipCount] = field(default_factory=list)

    def text(self) -> str:
        lines = [
            f"gate-head cost: {self.model} on {self.device} ({self.precision}), UNet input "
            f"{self.case}, {self.layers} gated layers sharing {self.heads} head(s), "
            f"{self.repeats} interleaved pairs (medians; ratio = median of per-pair ratios)",
            "  per-layer: text MLP in every layer; cached: once per head per UNet forward; "
            "activation: cached + latent MLP in the activation dtype",
            *(c.line() for c in self.comparisons),
        ]
        if self.flips:
            lines.append("gate flips, activation-dtype latent MLP vs the fp32 head:")
            lines += [f.line() for f in self.flips]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "device": self.device, "precision": self.precision,
            "case": self.case, "layers": self.layers, "heads": self.heads,
            "repeats": self.repeats,
            "comparisons": [c.as_dict() for c in self.comparisons],
            "flips": [f.__dict__ for f in self.flips],
        }  # fmt: skip


def run_gate_head_bench(config: GateHeadConfig, say: Say = lambda _: None) -> GateHeadResult:
    """Load the model and gates, time the head variants, count the flips."""
    from maskattn_deploy.gating.checkpoint import load_gates
    from maskattn_deploy.models import load_pipeline

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = config.precision or ("fp16" if device.type == "cuda" else "fp32")
    if precision not in DTYPES:
        raise UserError(f"precision {precision!r} is not supported; choose fp32, fp16 or bf16")
    for name in config.flip_dtypes:
        if name not in DTYPES:
            raise UserError(f"flip dtype {name!r} is not supported; choose fp16 or bf16")
    pipe = load_pipeline(config.model, torch_dtype=torch.float32, device="cpu")
    unet = pipe.unet.to(device).requires_grad_(False).eval()
    gates = load_gates(_gates_path(config), unet)
    feed = make_feed("unet", config.case, ModelDims.from_pipe(pipe), config.seed)
    result = GateHeadResult(
        model=config.model, device=str(device), precision=precision, case=config.case.label,
        layers=len(gates.layers), heads=len(gates.heads), repeats=config.repeats,
    )  # fmt: skip
    weights = {k: v.clone() for k, v in unet.state_dict().items()}  # fp32, to undo the casts
    dtype = DTYPES[precision]
    unet.to(dtype)
    say(f"timing the gate heads on {device} ({precision})")
    result.comparisons = _timings(unet, gates, _cast(feed, device, dtype), config)
    for name in config.flip_dtypes:
        unet.load_state_dict(weights)
        unet.to(DTYPES[name])
        say(f"counting gate flips on a {name} UNet")
        result.flips.append(count_gate_flips(unet, gates, _cast(feed, device, DTYPES[name]), name))
    unet.load_state_dict(weights)
    return result


def _gates_path(config: GateHeadConfig) -> Path:
    if config.gates is not None:
        return config.gates
    if config.model == "tiny":
        from maskattn_deploy.models.tiny import tiny_default_gates_dir

        return tiny_default_gates_dir()
    raise UserError("pass --gates CHECKPOINT: the gate-head benchmark needs gates for this model")


def _cast(feed: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device) if k == "timestep" else v.to(device, dtype) for k, v in feed.items()}


def _unet_step(unet: torch.nn.Module, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    added = {"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]}
    return unet(
        feed["sample"],
        feed["timestep"],
        encoder_hidden_states=feed["encoder_hidden_states"],
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


@contextlib.contextmanager
def _recording_inputs(unet: torch.nn.Module, gates: GateSet) -> Iterator[list[tuple]]:
    """Record each gated layer's (name, latents, context) in execution order."""
    records: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook_for(name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            records.append((name, args[0], kwargs["encoder_hidden_states"]))

        return hook

    handles = [
        unet.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True)
        for name in gates.layers
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _layer_inputs(unet: torch.nn.Module, gates: GateSet, feed: dict) -> list[tuple]:
    with torch.no_grad(), _recording_inputs(unet, gates) as records:
        _unet_step(unet, feed)
    return records


def _heads_of_one_forward(
    unet: torch.nn.Module, gates: GateSet, records: list[tuple], mode: GateMode
) -> Callable[[], None]:
    """The gate heads of one forward: every layer's gate logits, in one text-cache scope."""

    def run() -> None:
        with torch.no_grad(), gates.mode(mode):
            gates.text_cache.open(unet, ())
            try:
                for name, latents, context in records:
                    gates.gate_logits(name, latents, context)
            finally:
                gates.text_cache.close(unet, (), None)

    return run


def _timings(
    unet: torch.nn.Module, gates: GateSet, feed: dict, config: GateHeadConfig
) -> list[Comparison]:
    records = _layer_inputs(unet, gates, feed)
    sync = torch.cuda.synchronize if feed["sample"].is_cuda else (lambda: None)

    def step(mode: GateMode) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), gates.mode(mode):
                _unet_step(unet, feed)

        return run

    pairs = [("per-layer", BEFORE, "cached", CACHED)]
    if feed["sample"].dtype != torch.float32:
        pairs.append(("cached", CACHED, "activation", ACTIVATION))
    out = []
    for before_name, before, after_name, after in pairs:
        for what, make in (
            ("heads", lambda m: _heads_of_one_forward(unet, gates, records, m)),
            ("unet step", step),
        ):
            stats = measure_interleaved(
                make(after), make(before), config.repeats, config.warmup, sync=sync, settle=1
            )
            out.append(Comparison(what, before_name, after_name, stats))
    return out


def count_gate_flips(unet: torch.nn.Module, gates: GateSet, feed: dict, dtype: str) -> FlipCount:
    """Flips of the activation-dtype latent MLP against the fp32 head on one UNet step.

    ``unet`` (with ``gates`` installed) runs ``feed`` (the parity feed's names, in the UNet's
    dtype) once to record each gated layer's inputs; ``dtype`` labels the result. The GPU
    check calls it too.
    """
    from maskattn_deploy.ops.reference import open_mask
    from maskattn_deploy.parity.gates import gate_agreement
    from maskattn_deploy.parity.tolerances import gate_margin_for

    margin = gate_margin_for("fp16").margin
    threshold = gates.threshold
    agreements = []
    with torch.no_grad():
        for name, latents, context in _layer_inputs(unet, gates, feed):
            with gates.mode(CACHED):
                reference = gates.gate_logits(name, latents, context)
            with gates.mode(ACTIVATION):
                candidate = gates.gate_logits(name, latents, context)
            agreements.append(
                gate_agreement(
                    name,
                    f"activation-{dtype}",
                    reference,
                    open_mask(candidate, threshold),
                    threshold,
                    margin,
                )  # fmt: skip
            )
    return FlipCount(
        dtype=dtype,
        entries=sum(a.entries for a in agreements),
        flips=sum(a.flips for a in agreements),
        tolerated=sum(a.tolerated for a in agreements),
        near_threshold=sum(a.near_threshold for a in agreements),
        max_flip_distance=max((a.max_flip_distance for a in agreements), default=0.0),
        margin=margin,
        per_layer={a.layer: a.flips for a in agreements},
    )
