"""One spec per exported component: the single source of its I/O facts.

In the spirit of Optimum's ``OnnxConfig`` and the TensorRT diffusion demo's model classes, a
:class:`ComponentSpec` says, for ``unet``, ``text_encoder``, ``text_encoder_2``, ``vae_decoder``
and ``vae_encoder``:

- the input and output names, their symbolic axes and dtypes (what the manifest records, what
  the ONNX graph declares, what every backend's feed uses);
- how to draw seeded dummy inputs at a shape point (:meth:`ComponentSpec.dummy_inputs`: the
  export validation, the parity feeds, the benchmarks and the GPU check all use it);
- the tolerance of each precision against the PyTorch fp32 reference, with its reason (export
  validation and parity judge with it);
- the batch rule of its TensorRT profiles (:meth:`ComponentSpec.batch_range`);
- the module adapter (:meth:`ComponentSpec.adapter`) that the exporter traces, the torch backend
  runs, training calls and the GPU check times.

Axes are symbols. Dynamic ones come from a :class:`ShapePoint` (or a recipe's shape ranges):
``B`` batch, ``h``/``w`` latent height/width, ``H``/``W`` pixel height/width, ``S`` the UNet's
timesteps (one per row at a shape point; 1 is broadcast to the batch inside the graph). Static
widths come
from the model's :class:`ModelDims`: ``T`` text tokens, ``C`` latent channels, ``I`` image
channels, ``E`` the UNet's text width, ``P`` the pooled text width, ``E1``/``E2`` the text
encoders' hidden widths, ``L1``/``L2`` their layer counts (one ``hidden_states.<i>`` output per
hidden state, see :func:`hidden_state`). :func:`component_spec` resolves the static ones.

The text encoders' outputs follow Hugging Face Optimum's layout (its SDXL pipeline loads the
export unchanged, docs/optimum.md): ``last_hidden_state`` (``text_encoder``) or ``text_embeds``
then ``last_hidden_state`` (``text_encoder_2``), then every hidden state ``hidden_states.0..N``
(the embeddings, then each of the N layers). SDXL conditions on the penultimate one
(:func:`penultimate_state`); :func:`runtime_outputs` names what the served pipeline reads, which
is all a TensorRT engine keeps.

Importing this module does not import torch; the methods that make tensors do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.spec import (
    BATCH,
    LATENT_FACTOR,
    LATENT_H,
    LATENT_W,
    PIXEL_H,
    PIXEL_W,
    STEPS,
    TEXT_TOKENS,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

Dim = str | int
Triple = tuple[int, int, int]

# Dtype kinds of a tensor: ``float`` follows the export precision, the others are fixed.
FLOAT, FLOAT32, INT64 = "float", "float32", "int64"
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
_FLOAT_OF = {"fp32": "float32", "fp16": "float16"}

# Static width symbols (resolved from ModelDims).
TOKENS, LATENT_CH, IMAGE_CH, CONTEXT, POOLED, TEXT_1, TEXT_2 = "T", "C", "I", "E", "P", "E1", "E2"
LAYERS_1, LAYERS_2 = "L1", "L2"  # hidden layers of text_encoder / text_encoder_2
DYNAMIC_SYMBOLS = frozenset({BATCH, LATENT_H, LATENT_W, PIXEL_H, PIXEL_W, STEPS})
HIDDEN_STATES = "hidden_states"  # outputs hidden_states.0 .. hidden_states.N
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# --------------------------------------------------------------------------- small records


@dataclass(frozen=True)
class Tolerance:
    """Bounds for one output against the fp32 reference (they combine as in
    :mod:`maskattn_deploy.parity.compare`: element-wise ``atol``/``rtol``, relative L2 and
    cosine similarity)."""

    atol: float
    rtol: float
    max_rel_l2: float
    min_cosine: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"atol={self.atol:g} rtol={self.rtol:g} rel_l2<={self.max_rel_l2:g} "
            f"cos>={self.min_cosine:g}"
        )


@dataclass(frozen=True)
class ShapePoint:
    """One shape: UNet batch rows (CFG with one image is 2) and the image size in pixels."""

    batch: int
    height: int
    width: int

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // LATENT_FACTOR, self.width // LATENT_FACTOR

    def symbols(self) -> dict[str, int]:
        """Dynamic symbol -> size (pixels given, latents derived, one timestep per row)."""
        h, w = self.latent_hw
        return {
            BATCH: self.batch,
            STEPS: self.batch,
            PIXEL_H: self.height,
            PIXEL_W: self.width,
            LATENT_H: h,
            LATENT_W: w,
        }


@dataclass(frozen=True)
class ModelDims:
    """The model's static widths and token facts that resolve a spec's width symbols."""

    context_dim: int  # E: encoder_hidden_states width (both CLIPs concatenated)
    pooled_dim: int  # P: text_embeds width
    vocab_size: int = 49408  # CLIP's (only the text encoders' dummy inputs use the token facts)
    bos_id: int = 49406
    eos_id: int = 49407
    text_tokens: int = TEXT_TOKENS
    latent_channels: int = 4
    image_channels: int = 3
    text_widths: tuple[int, int] = (768, 1280)  # hidden widths of text_encoder, text_encoder_2
    text_layers: tuple[int, int] = (12, 32)  # hidden layers of text_encoder, text_encoder_2

    def symbols(self) -> dict[str, int]:
        return {
            TOKENS: self.text_tokens,
            LATENT_CH: self.latent_channels,
            IMAGE_CH: self.image_channels,
            CONTEXT: self.context_dim,
            POOLED: self.pooled_dim,
            TEXT_1: self.text_widths[0],
            TEXT_2: self.text_widths[1],
            LAYERS_1: self.text_layers[0],
            LAYERS_2: self.text_layers[1],
        }

    @classmethod
    def from_pipe(cls, pipe: Any) -> ModelDims:
        """Widths and token facts of a loaded diffusers SDXL pipeline."""
        tok = pipe.tokenizer
        return cls(
            context_dim=int(pipe.unet.config.cross_attention_dim),
            pooled_dim=int(pipe.text_encoder_2.config.projection_dim),
            vocab_size=int(pipe.text_encoder.config.vocab_size),
            bos_id=int(tok.bos_token_id),
            eos_id=int(tok.eos_token_id),
            text_tokens=int(tok.model_max_length),
            latent_channels=int(pipe.unet.config.in_channels),
            image_channels=int(pipe.vae.config.in_channels),
            text_widths=(
                int(pipe.text_encoder.config.hidden_size),
                int(pipe.text_encoder_2.config.hidden_size),
            ),
            text_layers=(
                int(pipe.text_encoder.config.num_hidden_layers),
                int(pipe.text_encoder_2.config.num_hidden_layers),
            ),
        )

    @classmethod
    def from_unet_config(cls, config: Any) -> ModelDims:
        """The UNet's widths from its config alone (no weights needed).

        SDXL's add-embedding input is the pooled text projection plus six time ids, each
        embedded to ``addition_time_embed_dim``.
        """
        cfg = dict(config)
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(
            cfg["addition_time_embed_dim"]
        )
        return cls(
            context_dim=int(cfg["cross_attention_dim"]),
            pooled_dim=pooled,
            latent_channels=int(cfg.get("in_channels", 4)),
        )


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, symbolic shape, dtype kind, how dummy values look.

    ``fill`` says how :meth:`ComponentSpec.dummy_inputs` draws values: ``normal`` (unit
    Gaussian: latents, hidden states), ``timestep`` (integers in the training range),
    ``time_ids`` (SDXL micro-conditioning of the point's size), ``token_ids`` (start token,
    words, end token, end-token padding) or ``image`` (uniform in [-1, 1]).

    ``per_state`` (a layer-count symbol such as ``L1``) makes the tensor a family of outputs,
    one per hidden state: ``<name>.0`` (the embeddings) to ``<name>.<count>`` (the last layer);
    :meth:`ComponentSpec.with_dims` expands it.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str = FLOAT
    fill: str = "normal"
    per_state: str | None = None

    def dtype_at(self, precision: str) -> str:
        """The concrete dtype name in an export of ``precision`` (fp32 / fp16)."""
        return _FLOAT_OF[_check_precision(precision)] if self.dtype == FLOAT else self.dtype

    def record(self, precision: str) -> dict[str, Any]:
        """The manifest's ``{"name", "dtype", "shape"}`` entry."""
        return {"name": self.name, "dtype": self.dtype_at(precision), "shape": list(self.shape)}

    def resolve(self, values: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape; ``values`` maps every symbol of the shape to a size."""
        try:
            return tuple(d if isinstance(d, int) else int(values[d]) for d in self.shape)
        except KeyError as exc:
            raise UserError(
                f"tensor {self.name!r} has axis {exc.args[0]!r} with no size; known: "
                f"{', '.join(sorted(values))}"
            ) from None

    def with_widths(self, widths: Mapping[str, int]) -> TensorSpec:
        """The same tensor with its static width symbols replaced by integers."""
        return replace(self, shape=tuple(widths.get(d, d) for d in self.shape))  # type: ignore[arg-type]

    def expanded(self, widths: Mapping[str, int]) -> tuple[TensorSpec, ...]:
        """This tensor with resolved widths; a ``per_state`` family as its members."""
        tensor = self.with_widths(widths)
        if self.per_state is None:
            return (tensor,)
        count = int(widths[self.per_state])
        return tuple(
            replace(tensor, name=hidden_state(i, self.name), per_state=None)
            for i in range(count + 1)
        )


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ComponentSpec:
    """The I/O contract of one component (see the module docstring)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerances: Mapping[str, Tolerance]  # precision -> tolerance of every output
    summary: str
    images_batch: bool = False  # batch counts images (the VAE), not UNet rows
    dims: ModelDims | None = field(default=None, compare=False)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input(self, name: str) -> TensorSpec:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise UserError(f"{self.name} has no input {name!r}; inputs: {', '.join(self.input_names)}")

    def with_dims(self, dims: ModelDims) -> ComponentSpec:
        """This spec with the model's static widths filled in (see :func:`component_spec`)."""
        widths = dims.symbols()
        return replace(
            self,
            inputs=tuple(t.with_widths(widths) for t in self.inputs),
            outputs=tuple(member for t in self.outputs for member in t.expanded(widths)),
            dims=dims,
        )

    def tolerance(self, precision: str) -> Tolerance:
        return self.tolerances[_check_precision(precision)]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Input/output name -> {axis: symbol} for every dynamic axis."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if d in DYNAMIC_SYMBOLS}
            for t in (*self.inputs, *self.outputs)
        }

    def io_records(self, precision: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The manifest's ``inputs`` and ``outputs`` lists at ``precision``."""
        return [t.record(precision) for t in self.inputs], [
            t.record(precision) for t in self.outputs
        ]

    def batch_range(self, batch: Triple) -> Triple:
        """The batch (min, opt, max) of this component for a recipe's UNet-row range.

        The text encoders see the UNet's rows; the VAE sees images, so its range is
        ``1 .. max`` with half the rows as the optimum (CFG doubles the rows).
        """
        lo, opt, hi = batch
        return (1, max(1, opt // 2), hi) if self.images_batch else (lo, opt, hi)

    def input_shapes(self, point: ShapePoint) -> dict[str, tuple[int, ...]]:
        """Input name -> concrete shape at ``point`` (needs the model's widths)."""
        values = {**self._dims().symbols(), **point.symbols()}
        return {t.name: t.resolve(values) for t in self.inputs}

    def dummy_inputs(self, point: ShapePoint, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded, non-zero inputs at ``point``: fp32 floats, int64 token ids, on the CPU.

        One ``torch.Generator`` per (component, point, seed) draws the inputs in order, so every
        backend and every rerun gets the very same numbers. Values look like the real thing:
        unit-variance latents, timesteps inside the training range, token ids framed by the
        start and end tokens, SDXL micro-conditioning of the point's size.
        """
        import torch

        dims = self._dims()
        gen = torch.Generator().manual_seed(_seed_for(self.name, point, seed))
        shapes = self.input_shapes(point)
        return {t.name: _draw(t.fill, shapes[t.name], point, dims, gen) for t in self.inputs}

    def graph_inputs(self, point: ShapePoint, seed: int, precision: str) -> dict[str, torch.Tensor]:
        """:meth:`dummy_inputs` cast to the graph's dtypes at ``precision`` (fp16 rounded)."""
        import torch

        feed = self.dummy_inputs(point, seed)
        return {t.name: feed[t.name].to(getattr(torch, t.dtype_at(precision))) for t in self.inputs}

    def adapter(self, module: nn.Module, gates: nn.Module | None = None) -> nn.Module:
        """The module with this spec's positional inputs and outputs (see
        :mod:`maskattn_deploy.export.adapters`); ``gates`` only for the UNet's export."""
        from maskattn_deploy.export.adapters import adapter_for

        return adapter_for(self.name, module, gates)

    def _dims(self) -> ModelDims:
        if self.dims is None:
            raise UserError(
                f"the {self.name} spec has no model widths; build it with component_spec()"
            )
        return self.dims


# --------------------------------------------------------------------------- dummy values


def _seed_for(component: str, point: ShapePoint, seed: int) -> int:
    # A stable per-(component, point) seed (Python's hash() is salted per process).
    text = f"{component}:{point.label}:{seed}"
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % (2**31)


def _draw(
    fill: str, shape: tuple[int, ...], point: ShapePoint, dims: ModelDims, gen: torch.Generator
) -> torch.Tensor:
    import torch

    if fill == "normal":
        return torch.randn(shape, generator=gen)
    if fill == "timestep":
        return torch.randint(1, 1000, shape, generator=gen).float()
    if fill == "time_ids":  # original size, crop offset, target size (pixels)
        row = [point.height, point.width, 0, 0, point.height, point.width]
        return torch.tensor([row], dtype=torch.float32).repeat(shape[0], 1)
    if fill == "image":
        return torch.rand(shape, generator=gen) * 2 - 1
    if fill == "token_ids":
        return _token_ids(shape[0], dims, gen)
    raise ValueError(f"unknown fill {fill!r}")


def _token_ids(batch: int, dims: ModelDims, gen: torch.Generator) -> torch.Tensor:
    """``[batch, T]`` int64: start token, 3..20 random word ids, end token, end-token padding."""
    import torch

    t = dims.text_tokens
    ids = torch.full((batch, t), dims.eos_id, dtype=torch.long)
    special = torch.tensor(sorted({dims.bos_id, dims.eos_id}))
    for row in range(batch):
        length = int(torch.randint(3, min(21, t - 1), (1,), generator=gen))
        words = torch.randint(0, dims.vocab_size, (length,), generator=gen)
        words = torch.where(torch.isin(words, special), torch.ones_like(words), words)
        ids[row, 0] = dims.bos_id
        ids[row, 1 : 1 + length] = words
        ids[row, 1 + length] = dims.eos_id
    return ids


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(
            f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)} (add its "
            "tolerances to maskattn_deploy/export/component_spec.py)"
        )
    return precision


# --------------------------------------------------------------------------- the five specs
# Tolerances: fp32 numbers were measured on the tiny model (ONNX Runtime CPU vs torch CPU)
# with headroom of about 10x; fp16 numbers bound an fp16 graph against the fp32 reference
# (rounding to 11 significant bits, compounded through the network), checked on the tiny fp16
# export under ONNX Runtime CPU.

_CLIP_FP16 = "fp16 CLIP vs fp32: large residual channels round coarsely"
_VAE_FP16 = "the exporter keeps the VAE fp32 (fp16 SDXL VAE overflows); slack for fp16 inputs"

_UNET = ComponentSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", (BATCH, LATENT_CH, LATENT_H, LATENT_W)),
        TensorSpec("timestep", (STEPS,), FLOAT32, "timestep"),
        TensorSpec("encoder_hidden_states", (BATCH, TOKENS, CONTEXT)),
        TensorSpec("text_embeds", (BATCH, POOLED)),
        TensorSpec("time_ids", (BATCH, 6), FLOAT32, "time_ids"),
    ),
    outputs=(TensorSpec("out_sample", (BATCH, LATENT_CH, LATENT_H, LATENT_W)),),
    tolerances={
        "fp32": Tolerance(
            1e-4,
            1e-3,
            1e-4,
            0.99999,
            "fp32 graph vs fp32 eager: op fusion/reordering only (measured max 1.5e-6, L2 9e-7)",
        ),
        "fp16": Tolerance(
            5e-2,
            5e-2,
            2e-2,
            0.9995,
            "fp16 graph vs fp32: 11-bit rounding compounded over the UNet (tiny: max 4.7e-3, "
            "L2 2.2e-3)",
        ),
    },  # fmt: skip
    summary="noise prediction: latents, timestep (fp32; [1] or one per row), text states, "
    "pooled text, size ids (fp32) -> out_sample",
)
_TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    inputs=(TensorSpec("input_ids", (BATCH, TOKENS), INT64, "token_ids"),),
    outputs=(
        TensorSpec("last_hidden_state", (BATCH, TOKENS, TEXT_1)),
        TensorSpec(HIDDEN_STATES, (BATCH, TOKENS, TEXT_1), per_state=LAYERS_1),
    ),
    tolerances={
        "fp32": Tolerance(
            1e-4,
            1e-3,
            1e-5,
            0.99999,
            "fp32 CLIP: reordered reductions in LayerNorm/softmax only (measured max 8e-7)",
        ),
        "fp16": Tolerance(5e-2, 5e-2, 1e-2, 0.9995, f"{_CLIP_FP16} (tiny: max 1.3e-3)"),
    },  # fmt: skip
    summary="CLIP token ids -> last hidden state (final norm), every hidden state",
)
_TEXT_ENCODER_2 = ComponentSpec(
    name="text_encoder_2",
    inputs=(TensorSpec("input_ids", (BATCH, TOKENS), INT64, "token_ids"),),
    outputs=(
        TensorSpec("text_embeds", (BATCH, POOLED)),
        TensorSpec("last_hidden_state", (BATCH, TOKENS, TEXT_2)),
        TensorSpec(HIDDEN_STATES, (BATCH, TOKENS, TEXT_2), per_state=LAYERS_2),
    ),
    tolerances={
        "fp32": Tolerance(
            1e-4,
            1e-3,
            1e-5,
            0.99999,
            "fp32 CLIP with projection: same ops as text_encoder (measured max 1.4e-6)",
        ),
        "fp16": Tolerance(5e-2, 5e-2, 1e-2, 0.9995, f"{_CLIP_FP16} (tiny: max 2.0e-3)"),
    },  # fmt: skip
    summary="CLIP token ids -> pooled projection, last hidden state, every hidden state",
)
_VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latent_sample", (BATCH, LATENT_CH, LATENT_H, LATENT_W)),),
    outputs=(TensorSpec("sample", (BATCH, IMAGE_CH, PIXEL_H, PIXEL_W)),),
    tolerances={
        "fp32": Tolerance(
            1e-3,
            1e-3,
            1e-4,
            0.99999,
            "fp32 VAE decoder: conv algorithms differ (measured max 3.8e-5, L2 9e-6)",
        ),
        "fp16": Tolerance(1e-2, 1e-2, 5e-3, 0.9999, _VAE_FP16),
    },  # fmt: skip
    summary="latents (already divided by the VAE scaling factor) -> image in [-1, 1] (unclamped)",
    images_batch=True,
)
_VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    inputs=(TensorSpec("sample", (BATCH, IMAGE_CH, PIXEL_H, PIXEL_W), FLOAT, "image"),),
    outputs=(TensorSpec("latent_sample", (BATCH, LATENT_CH, LATENT_H, LATENT_W)),),
    tolerances={
        "fp32": Tolerance(1e-3, 1e-3, 1e-4, 0.99999, "fp32 VAE encoder: conv reordering only"),
        "fp16": Tolerance(1e-2, 1e-2, 5e-3, 0.9999, _VAE_FP16),
    },  # fmt: skip
    summary="image in [-1, 1] -> mean of the latent distribution (not scaled)",
    images_batch=True,
)

# Component name -> spec with symbolic widths, in pipeline order.
SPECS: dict[str, ComponentSpec] = {
    s.name: s for s in (_UNET, _TEXT_ENCODER, _TEXT_ENCODER_2, _VAE_DECODER, _VAE_ENCODER)
}
# component -> (input names, output names)
COMPONENT_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    name: (spec.input_names, spec.output_names) for name, spec in SPECS.items()
}


def hidden_state(index: int, family: str = HIDDEN_STATES) -> str:
    """Output name of hidden state ``index`` (0: the embeddings, N: the last layer's)."""
    return f"{family}.{index}"


def penultimate_state(outputs: Iterable[str]) -> str:
    """The penultimate hidden state among a text encoder's outputs (all of them, as exported):
    ``hidden_states.<N-1>`` of ``hidden_states.0..N``, the layer SDXL conditions on."""
    prefix = f"{HIDDEN_STATES}."
    indices = [int(n[len(prefix) :]) for n in outputs if n.startswith(prefix)]
    if len(indices) < 2:
        raise UserError(
            "the text encoder has no hidden_states.<i> outputs; re-export it with this version "
            "of maskattn-deploy export"
        )
    return hidden_state(max(indices) - 1)


def runtime_outputs(component: str, outputs: Iterable[str]) -> tuple[str, ...]:
    """The outputs the served pipeline reads among ``component``'s exported ``outputs``.

    The text encoders: the penultimate hidden state (and ``text_embeds``), not the other
    states Optimum's layout adds; every other component: its spec's outputs (not ``--per-layer``
    probabilities).
    """
    outputs = tuple(outputs)
    if component in TEXT_ENCODERS:
        keep = {penultimate_state(outputs), "text_embeds"}
    else:
        keep = set(spec_template(component).output_names)
    return tuple(n for n in outputs if n in keep)


def engine_outputs(component: str, outputs: Iterable[str]) -> tuple[str, ...] | None:
    """The outputs a TensorRT engine of ``component`` keeps marked unless told otherwise.

    The text encoders keep what the runtime reads (:func:`runtime_outputs`): the other hidden
    states of Optimum's layout then feed nothing, so TensorRT removes the layers behind them
    (the first encoder's last layer and final norm). None (all) for the other components,
    whose extra outputs (``--per-layer`` probabilities) parity reads from the engine.
    """
    return runtime_outputs(component, outputs) if component in TEXT_ENCODERS else None


def spec_template(name: str) -> ComponentSpec:
    """The spec of ``name`` with symbolic widths (one-line error for an unknown component)."""
    if name not in SPECS:
        raise UserError(f"unknown component {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def component_spec(name: str, dims: ModelDims) -> ComponentSpec:
    """The spec of ``name`` for a model with ``dims`` (static widths resolved)."""
    return spec_template(name).with_dims(dims)
