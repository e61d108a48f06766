"""Which text-encoder outputs the runtime reads and a TensorRT engine keeps (Optimum's layout).

The export's text encoders return ``last_hidden_state`` (``text_embeds`` first for the second
encoder) and then every hidden state ``hidden_states.0..N``; SDXL conditions on the
penultimate one. The expected names are written out here for the tiny CLIPs (3 layers) and
SDXL's (12 and 32 layers).
"""

from __future__ import annotations

import pytest

from maskattn_deploy.errors import UserError
from maskattn_deploy.export.component_spec import (
    ModelDims,
    component_spec,
    engine_outputs,
    penultimate_state,
    runtime_outputs,
)


def layout(layers: int, pooled: bool) -> list[str]:
    states = [f"hidden_states.{i}" for i in range(layers + 1)]
    return [*(["text_embeds"] if pooled else []), "last_hidden_state", *states]


@pytest.mark.parametrize(("layers", "penultimate"), [(3, "hidden_states.2"), (12, "hidden_states.11"), (32, "hidden_states.31")])  # fmt: skip
def test_the_penultimate_state_is_read(layers: int, penultimate: str) -> None:
    assert penultimate_state(layout(layers, False)) == penultimate
    assert runtime_outputs("text_encoder", layout(layers, False)) == (penultimate,)
    assert runtime_outputs("text_encoder_2", layout(layers, True)) == ("text_embeds", penultimate)
    assert engine_outputs("text_encoder_2", layout(layers, True)) == ("text_embeds", penultimate)


def test_specs_expand_the_hidden_states_per_model() -> None:
    dims = ModelDims(context_dim=2048, pooled_dim=1280)  # SDXL's widths and depths
    assert list(component_spec("text_encoder", dims).output_names) == layout(12, False)
    assert list(component_spec("text_encoder_2", dims).output_names) == layout(32, True)


def test_other_components_keep_their_own_outputs() -> None:
    outputs = ["out_sample", "probs/mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert runtime_outputs("unet", outputs) == ("out_sample",)
    assert engine_outputs("unet", outputs) is None  # per-layer probabilities stay for parity
    assert engine_outputs("vae_decoder", ["sample"]) is None


def test_an_export_from_before_the_layout_names_the_fix() -> None:
    with pytest.raises(UserError, match="re-export"):
        runtime_outputs("text_encoder", ["hidden_states"])
