"""The shared heads' text features are computed once per UNet forward (gating/text_cache.py).

Every check compares against the uncached head (``GateMode(text_cache=False)``, each layer
computes its own ``MLP_e(ctx)``), which is what the gates computed before the cache existed.
"""

from __future__ import annotations

import pytest
import torch
from test_gating import randomize, sdxl_inputs

from maskattn_deploy.gating import GateConfig, GateMode, install_gates
from maskattn_deploy.models.tiny import build_tiny_unet


def gated_unet(stage: str = "all", dtype: torch.dtype = torch.float32, std: float = 0.5):
    unet = build_tiny_unet().to(dtype)
    gates = install_gates(unet, GateConfig(stage=stage))
    randomize(gates, seed=7, std=std)
    return unet, gates


def run(unet, feed, **kwargs) -> torch.Tensor:
    return unet(**feed, **kwargs, return_dict=False)[0]


def count_text_mlp_calls(gates) -> list[str]:
    """A list that gets the head id each time a head's text MLP runs."""
    calls: list[str] = []
    for key, head in gates.heads.items():
        head.text_mlp.register_forward_hook(lambda *_, _key=key: calls.append(_key))
    return calls


def cast(feed: dict, dtype: torch.dtype) -> dict:
    out = {
        k: v.to(dtype) if k != "timestep" else v
        for k, v in feed.items()
        if k != "added_cond_kwargs"
    }
    out["added_cond_kwargs"] = {k: v.to(dtype) for k, v in feed["added_cond_kwargs"].items()}
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["sdpa", "op"])
def test_cached_head_gives_bit_identical_outputs(dtype: torch.dtype, attention: str) -> None:
    unet, gates = gated_unet(dtype=dtype)
    feed = cast(sdxl_inputs(unet), dtype)
    calls = count_text_mlp_calls(gates)
    with torch.no_grad(), gates.mode(attention=attention):
        cached = run(unet, feed)
        per_forward = len(calls)
        with gates.mode(text_cache=False):
            uncached = run(unet, feed)
    assert torch.equal(cached, uncached)
    # Once per head (3 shared heads: high, mid, low) instead of once per gated layer (22).
    assert per_forward == len(gates.heads) == 3
    assert len(calls) - per_forward == len(gates.layers) == 22


def test_no_value_outlives_its_forward() -> None:
    """CFG halves as separate forwards, a weight update between forwards with the same context
    tensor, a forward that raises: each forward computes its own features."""
    unet, gates = gated_unet()
    feed = sdxl_inputs(unet)
    other = dict(feed, encoder_hidden_states=torch.randn_like(feed["encoder_hidden_states"]))
    with torch.no_grad():
        with gates.mode(text_cache=False):
            expected = [run(unet, feed), run(unet, other)]
        assert torch.equal(run(unet, feed), expected[0])
        assert torch.equal(run(unet, other), expected[1])  # the other half: its own features
        assert not gates.text_cache.active and not gates.text_cache.values
        for head in gates.heads.values():  # as an optimizer step would, same ctx tensor next
            head.text_mlp[3].weight.mul_(-1.0)
        with gates.mode(text_cache=False):
            updated = run(unet, feed)
        assert not torch.equal(updated, expected[0])
        assert torch.equal(run(unet, feed), updated)

        def fail(*args, **kwargs):
            raise RuntimeError("late failure")

        handle = unet.conv_out.register_forward_pre_hook(fail)  # after every gated layer
        with pytest.raises(RuntimeError, match="late failure"):
            run(unet, feed)
        handle.remove()
    assert not gates.text_cache.active and not gates.text_cache.values


def test_calls_outside_a_unet_forward_are_not_cached() -> None:
    unet, gates = gated_unet(stage="mid")
    layer = gates.layers[0]
    attn = unet.get_submodule(layer)
    calls = count_text_mlp_calls(gates)
    x, ctx = torch.randn(2, 16, attn.query_dim), torch.randn(2, 77, attn.cross_attention_dim)
    with torch.no_grad():
        first = gates.gate_logits(layer, x, ctx)
        second = gates.gate_logits(gates.layers[1], x, ctx)
    assert len(calls) == 2 and not gates.text_cache.values
    assert torch.equal(first, second)  # same shared head, same inputs


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gradients_match_the_uncached_head(checkpointing: bool) -> None:
    """One v feeds every layer of its head, so autograd sums the layers' gradients before the
    text MLP's backward instead of after it: the same gradients up to fp32 summation order.
    With gradient checkpointing the cache stays closed (recomputed blocks must run the ops of
    their forward), so gradients are bit-identical to the uncached ones. Backward runs inside
    the mode: checkpointed blocks recompute their forward there and read the mode again."""
    unet, gates = gated_unet(std=0.1)  # 0.5: logits so large that the STE gradient is nan
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    feed = sdxl_inputs(unet)
    calls = count_text_mlp_calls(gates)
    grads, losses = [], []
    for text_cache in (True, False):
        gates.zero_grad(set_to_none=True)
        with gates.mode(GateMode.for_training("relaxed"), text_cache=text_cache):
            loss = run(unet, feed).square().mean()
            if text_cache:  # forward only: checkpointed blocks run again in backward
                cached_calls = len(calls)
            loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in gates.named_parameters()})
    assert torch.equal(losses[0], losses[1])  # the forward is bit-identical
    assert cached_calls == (len(gates.layers) if checkpointing else len(gates.heads))
    for key, cached in grads[0].items():
        assert "text_mlp" not in key or cached.abs().sum() > 0, key  # the cached part learns
        if checkpointing:
            assert torch.equal(cached, grads[1][key]), key
        else:
            torch.testing.assert_close(cached, grads[1][key], rtol=1e-5, atol=1e-7)  # fp32 sums
