"""The torch reference record: per gated layer, the op's gate logits and probabilities, in order."""

from __future__ import annotations

import copy

import pytest
import torch

from maskattn_deploy.errors import UserError
from maskattn_deploy.gating import AttentionImpl
from maskattn_deploy.gating.checkpoint import load_gates
from maskattn_deploy.models.tiny import tiny_default_gates_dir
from maskattn_deploy.ops.reference import open_mask
from maskattn_deploy.parity.capture import capture_gated_layers
from maskattn_deploy.parity.inputs import ModelDims, ShapeCase, make_feed, parse_shapes


@pytest.fixture(scope="module")
def gated_unet(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    gates = load_gates(tiny_default_gates_dir(), unet)
    return unet, gates


def _forward(unet, feed):
    with torch.inference_mode():
        return unet(
            feed["sample"],
            feed["timestep"],
            encoder_hidden_states=feed["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]},
        ).sample


def test_capture_matches_gate_heads_and_execution_order(gated_unet) -> None:
    unet, gates = gated_unet
    case = ShapeCase(2, 128, 128)
    feed = make_feed("unet", case, ModelDims.from_unet_config(unet.config))
    # Independent record: the attn2 inputs, through plain forward hooks.
    inputs, order = {}, []

    def keep(name):
        def hook(module, args, kwargs):
            inputs[name] = (args[0].clone(), kwargs["encoder_hidden_states"].clone())
            order.append(name)

        return hook

    handles = [
        unet.get_submodule(n).register_forward_pre_hook(keep(n), with_kwargs=True)
        for n in gates.layers
    ]
    try:
        with capture_gated_layers(unet, gates) as capture:
            out = _forward(unet, feed)
    finally:
        for h in handles:
            h.remove()
    assert gates.current_mode.attention is AttentionImpl.AUTO  # restored
    # The op path and the eager SDPA path agree (same semantics, fp32 rounding only).
    torch.testing.assert_close(out, _forward(unet, feed), rtol=0, atol=1e-5)
    assert [r.layer for r in capture.records] == order and len(order) == len(gates.layers)
    for record in capture.records:
        x, ctx = inputs[record.layer]
        with torch.no_grad():
            expected = gates.gate_logits(record.layer, x, ctx)  # [b, n, t]
        torch.testing.assert_close(record.gate_logits, expected, rtol=0, atol=1e-6)
        is_open = open_mask(record.gate_logits, record.threshold)
        b, h, n, t = record.probs.shape
        assert (b, n, t) == tuple(is_open.shape) and h == unet.get_submodule(record.layer).heads
        # Closed tokens get exactly 0; each row sums to 1 (fp32 rounding).
        assert torch.all(record.probs.masked_select(~is_open[:, None].expand_as(record.probs)) == 0)
        torch.testing.assert_close(record.probs.sum(-1), torch.ones(b, h, n), rtol=0, atol=1e-5)


def test_inputs_are_seeded_nonzero_and_framed() -> None:
    dims = ModelDims(context_dim=64, pooled_dim=32, vocab_size=1000, bos_id=998, eos_id=999)
    case = ShapeCase(2, 256, 192)
    feed = make_feed("unet", case, dims, seed=3)
    assert feed["sample"].shape == (2, 4, 32, 24) and feed["encoder_hidden_states"].shape == (
        2,
        77,
        64,
    )
    assert torch.equal(feed["sample"], make_feed("unet", case, dims, seed=3)["sample"])
    assert not torch.equal(feed["sample"], make_feed("unet", case, dims, seed=4)["sample"])
    assert (feed["sample"] != 0).all() and (feed["timestep"] >= 1).all()
    assert feed["time_ids"][0].tolist() == [256, 192, 0, 0, 256, 192]
    ids = make_feed("text_encoder", case, dims)["input_ids"]
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    for row in ids.tolist():
        end = row.index(999)
        assert row[0] == 998 and 4 <= end <= 21 and set(row[end:]) == {999}
        assert 998 not in row[1:end] and 999 not in row[1:end]


def test_parse_shapes() -> None:
    assert parse_shapes("2x256x256, 1x128x192") == [ShapeCase(2, 256, 256), ShapeCase(1, 128, 192)]
    for bad in ("2x256", "0x256x256", "2x250x256"):
        with pytest.raises(UserError):
            parse_shapes(bad)
