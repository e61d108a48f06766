"""Gates forced open export the ungated UNet (micro SDXL-shaped UNet: fast to trace).

The gated tiny UNet graph itself (one custom node per gated layer, parity, inlining) is tested
on the tiny pipeline export in test_export_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from maskattn_deploy.export import export_unet
from maskattn_deploy.export.graph import standard_softmax_layers
from maskattn_deploy.export.onnx_op import custom_nodes
from maskattn_deploy.gating import GateConfig, install_gates, remove_gates

pytestmark = pytest.mark.slow


def micro_unet() -> torch.nn.Module:
    """SDXL's UNet blocks (text_time add-embeds, linear projections) at the smallest size."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    ).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One micro UNet exported with every gate forced open, then without gates."""
    root = tmp_path_factory.mktemp("unet")
    unet = micro_unet()
    torch.manual_seed(1)
    gates = install_gates(unet, GateConfig(stage="all", hidden_dim=16))
    with torch.no_grad():
        for head in gates.heads.values():
            head.bias.fill_(-0.3)  # many closed tokens: forcing them open must matter
    with gates.forced_open():
        opened = export_unet(unet, root / "open", validate=True)
    layers = list(gates.layers)
    remove_gates(unet)
    plain = export_unet(unet, root / "plain", validate=False)
    return {"open": opened.out, "plain": plain.out, "layers": layers, "unet": unet}


def _load(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)


def _run(folder: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    path = str(folder / "unet" / "model.onnx")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["out_sample"], feed)[0]


def _feed(batch: int, size: int) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(batch * 100 + size)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=gen).numpy(),
        "timestep": torch.tensor([37.0, 801.0][:batch]).numpy(),
        "encoder_hidden_states": torch.randn(batch, 77, 32, generator=gen).numpy(),
        "text_embeds": torch.randn(batch, 16, generator=gen).numpy(),
        "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch).numpy(),
    }


def test_forced_open_export_equals_ungated_export(exports) -> None:
    thresholds = {
        a.f for n in custom_nodes(_load(exports["open"]).graph.node) for a in n.attribute
        if a.name == "threshold"
    }  # fmt: skip
    assert thresholds == {float("-inf")}
    assert not custom_nodes(_load(exports["plain"]).graph.node)
    for batch, size in ((1, 16), (2, 24)):
        feed = _feed(batch, size)
        opened, plain = _run(exports["open"], feed), _run(exports["plain"], feed)
        # Same math, different op order (explicit q k^T * scale vs the SDPA decomposition).
        np.testing.assert_allclose(opened, plain, atol=1e-5, rtol=0)


def test_timestep_of_one_is_broadcast_to_the_batch(exports) -> None:
    """``timestep`` [1] (what diffusers and Optimum pass) equals [t, t]; [3] at batch 2 fails."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    feed = _feed(2, 16)
    one = {**feed, "timestep": feed["timestep"][:1]}
    both = {**feed, "timestep": np.repeat(feed["timestep"][:1], 2)}
    for folder in (exports["open"], exports["plain"]):
        np.testing.assert_array_equal(_run(folder, one), _run(folder, both))
        assert not np.array_equal(_run(folder, feed), _run(folder, both))  # per-row differs
        with pytest.raises(InvalidArgument, match="timestep/broadcast"):
            _run(folder, {**feed, "timestep": np.array([1.0, 2.0, 3.0], np.float32)})
    inputs = {i.name: i for i in _load(exports["open"]).graph.input}
    assert [d.dim_param for d in inputs["timestep"].type.tensor_type.shape.dim] == ["S"]


def test_open_export_is_gated_and_plain_export_is_not(exports) -> None:
    opened, plain = _load(exports["open"]), _load(exports["plain"])
    layers = exports["layers"]
    assert len(custom_nodes(opened.graph.node)) == len(layers) == 4  # stage=all: every attn2
    assert not set(standard_softmax_layers(opened)) & set(layers)
    assert set(layers) <= set(standard_softmax_layers(plain))


def test_unet_manifest_records_io_and_forced_open_gates(exports) -> None:
    manifest = json.loads((exports["open"] / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    assert unet["inputs"][0]["shape"] == ["B", 4, "h", "w"]
    assert unet["inputs"][2]["shape"] == ["B", 77, 32]
    assert unet["gated_layers"] == exports["layers"] == manifest["gated_layers"]
    assert manifest["gates"]["threshold"] == "-inf"
    checks = manifest["validation"]["unet"]["checks"]
    assert len(checks) == 2 and all(c["ok"] for c in checks)
    assert json.loads((exports["plain"] / "manifest.json").read_text())["gates"] is None
    # A lone UNet gets its diffusers config (Hugging Face layout) but no pipeline index.
    config = json.loads((exports["open"] / "unet" / "config.json").read_text())
    assert (config["_class_name"], config["cross_attention_dim"]) == ("UNet2DConditionModel", 32)
    assert not (exports["open"] / "model_index.json").exists()
