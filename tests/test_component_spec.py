"""One spec per component: export, engine profiles, parity feeds and GPU-check inputs agree.

The expected shapes are written out here from the tiny model's configs (pixels / 8 for
latents, the CLIP widths, 77 tokens), independently of the spec, and every consumer of the
spec is checked against them at two shape points: the exporter's component (its manifest
records and its traced inputs), the TensorRT profiles of a static recipe at the point, the
parity feed, the GPU check's UNet inputs, and the torch backend running the spec's adapter.
"""

from __future__ import annotations

import pytest
import torch

from maskattn_deploy.bench.gpu_check.model import unet_inputs, unet_step_module
from maskattn_deploy.engine.profiles import component_profiles
from maskattn_deploy.export.component_spec import (
    COMPONENT_IO,
    ModelDims,
    ShapePoint,
    component_spec,
    spec_template,
)
from maskattn_deploy.export.components import PIPELINE_ATTR, pipeline_component, unet_component
from maskattn_deploy.export.spec import LATENT_FACTOR, TEXT_TOKENS
from maskattn_deploy.parity.inputs import make_feed
from maskattn_deploy.parity.tolerances import TOLERANCES
from maskattn_deploy.recipes import load_recipe
from maskattn_deploy.runtime.torch_backend import TorchComponentRunner

POINTS = (ShapePoint(1, 128, 192), ShapePoint(2, 256, 128))
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")


@pytest.fixture(scope="module")
def pipe():
    from maskattn_deploy.models import load_pipeline

    return load_pipeline("tiny")


def expected_io(pipe, name: str, p: ShapePoint) -> tuple[dict, dict]:
    """Input and output shapes of ``name`` at ``p``, from the model configs.

    The text encoders' outputs are Optimum's layout: (``text_embeds``,) ``last_hidden_state``,
    then ``hidden_states.0`` (embeddings) to ``hidden_states.<layers>`` (the last layer).
    """
    unet, vae = pipe.unet.config, pipe.vae.config
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    b, h, w = p.batch, p.height // 8, p.width // 8
    latents, image = (b, unet.in_channels, h, w), (b, vae.in_channels, p.height, p.width)
    pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim

    def states(config) -> dict:
        shape = (b, 77, config.hidden_size)
        return {"last_hidden_state": shape} | {
            f"hidden_states.{i}": shape for i in range(config.num_hidden_layers + 1)
        }

    return {
        "unet": (
            {"sample": latents, "timestep": (b,), "time_ids": (b, 6), "text_embeds": (b, pooled),
             "encoder_hidden_states": (b, 77, te1.hidden_size + te2.hidden_size)},
            {"out_sample": latents},
        ),
        "text_encoder": ({"input_ids": (b, 77)}, states(te1)),
        "text_encoder_2": (
            {"input_ids": (b, 77)}, {"text_embeds": (b, te2.projection_dim), **states(te2)},
        ),
        "vae_decoder": ({"latent_sample": latents}, {"sample": image}),
        "vae_encoder": ({"sample": image}, {"latent_sample": latents}),
    }[name]  # fmt: skip


def runtime_reads(pipe, name: str) -> set[str]:
    """What the served pipeline reads: SDXL's penultimate text states and the pooled text."""
    if name == "text_encoder":
        return {f"hidden_states.{pipe.text_encoder.config.num_hidden_layers - 1}"}
    if name == "text_encoder_2":
        return {f"hidden_states.{pipe.text_encoder_2.config.num_hidden_layers - 1}", "text_embeds"}
    return set(COMPONENT_IO[name][1])


def export_component(pipe, name: str, precision: str = "fp32"):
    dims = ModelDims.from_pipe(pipe)
    if name == "unet":
        return unet_component(pipe.unet, None, precision, dims)
    return pipeline_component(name, pipe, precision, dims)


def static_recipe(p: ShapePoint) -> dict:
    recipe = load_recipe("export", "tiny")
    point = {"batch": [p.batch] * 3, "height": [p.height] * 3, "width": [p.width] * 3}
    return {**recipe, "profiles": [{"name": "point", **point}]}


def test_one_definition_of_the_shape_facts() -> None:
    assert LATENT_FACTOR == 8 and TEXT_TOKENS == 77
    assert ShapePoint(2, 256, 128).latent_hw == (32, 16)
    assert list(COMPONENT_IO) == list(COMPONENTS)
    for name in COMPONENTS:  # export validation and parity judge with the same rows
        for precision in ("fp32", "fp16"):
            assert TOLERANCES[(name, precision)] is spec_template(name).tolerance(precision)
            assert spec_template(name).tolerance(precision).reason


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.label)
@pytest.mark.parametrize("name", COMPONENTS)
def test_consumers_agree_with_the_model(pipe, name: str, point: ShapePoint) -> None:
    want_in, want_out = expected_io(pipe, name, point)
    dims = ModelDims.from_pipe(pipe)
    values = point.symbols()

    # Export: manifest records, concretised at the point, and the traced inputs.
    component = export_component(pipe, name)
    assert {t.name: t.resolve(values) for t in component.inputs} == want_in
    assert {t.name: t.resolve(values) for t in component.outputs} == want_out
    traced = component.graph_inputs(point, seed=0)
    assert {k: tuple(v.shape) for k, v in traced.items()} == want_in

    # Engine: a static profile at the point (the VAE's batch counts images: 1 .. rows).
    (profile,) = component_profiles(
        static_recipe(point), name, [t.record("fp32") for t in component.inputs]
    )
    assert {k: r.max for k, r in profile.shapes.items()} == want_in
    if name.startswith("vae"):
        assert all(r.min[0] == 1 for r in profile.shapes.values())
    else:  # one timestep (broadcast in the graph) or one per row
        static = {k: r for k, r in profile.shapes.items() if k != "timestep"}
        assert all(r.min == r.opt == r.max for r in static.values())
    if name == "unet":
        assert profile.shapes["timestep"].min == profile.shapes["timestep"].opt == (1,)

    # Parity: the feed has the shapes, and the export traced the very same values.
    feed = make_feed(name, point, dims, seed=0)
    assert {k: tuple(v.shape) for k, v in feed.items()} == want_in
    for key, value in feed.items():
        assert torch.equal(traced[key], value), key

    # Torch backend: the runner calls the spec's adapter on the feed.
    module = getattr(pipe, PIPELINE_ATTR[name])
    spec = component_spec(name, dims)
    runner = TorchComponentRunner(name, module, torch.device("cpu"), spec=spec)
    out = runner.infer(feed)
    reads = runtime_reads(pipe, name)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: want_out[k] for k in reads}


@pytest.mark.parametrize("size", [128, 256])
def test_gpu_check_inputs_are_the_parity_feed(pipe, size: int) -> None:
    point = ShapePoint(2, size, size)  # the GPU check times one CFG step on square latents
    latent = size // 8
    inputs = unet_inputs(pipe.unet, latent, torch.float32, torch.device("cpu"), 7)
    feed = make_feed("unet", point, ModelDims.from_pipe(pipe), seed=7)
    assert list(inputs) == list(feed)
    for key in feed:
        assert torch.equal(inputs[key], feed[key]), key
    half = unet_inputs(pipe.unet, latent, torch.float16, torch.device("cpu"), 7)
    dtypes = {k: v.dtype for k, v in half.items()}
    assert dtypes == {"sample": torch.float16, "timestep": torch.float32,
                      "encoder_hidden_states": torch.float16, "text_embeds": torch.float16,
                      "time_ids": torch.float32}  # fmt: skip
    with torch.no_grad():
        out = unet_step_module(pipe.unet)(*inputs.values())
    assert tuple(out.shape) == expected_io(pipe, "unet", point)[1]["out_sample"]


def test_fp16_records_keep_the_fp32_islands(pipe) -> None:
    component = export_component(pipe, "unet", "fp16")
    dtypes = {r["name"]: r["dtype"] for r in (t.record("fp16") for t in component.inputs)}
    assert dtypes == {"sample": "float16", "timestep": "float32",
                      "encoder_hidden_states": "float16", "text_embeds": "float16",
                      "time_ids": "float32"}  # fmt: skip
    spec = component_spec("text_encoder", ModelDims.from_pipe(pipe))
    assert spec.input("input_ids").record("fp16")["dtype"] == "int64"
    assert spec.dynamic_axes()["input_ids"] == {0: "B"}
