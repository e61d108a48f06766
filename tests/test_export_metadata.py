"""Hugging Face metadata of export folders: model_index.json, config.json, tokenizer files.

Written from the built-in tiny pipeline directly (no ONNX export: seconds). That Optimum really
loads a whole export is tests/test_optimum.py; here each file is checked against the pipeline
it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskattn_deploy.errors import ExportError
from maskattn_deploy.export.metadata import (
    TOKENIZER_FILES,
    collect_metadata,
    model_index,
    save_tokenizer,
    write_metadata,
)

COMPONENTS = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
PROMPTS = ["a red square left of a green circle", "An unusual Zebra-crossing, at 3pm!"]


def test_model_index_and_component_configs(tiny_pipe, tmp_path: Path) -> None:
    written = write_metadata(collect_metadata(tiny_pipe, COMPONENTS), tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "model_index.json",
        *(f"{name}/config.json" for name in COMPONENTS),
    }
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["force_zeros_for_empty_prompt"] is True

    def config(name: str) -> dict:
        return json.loads((tmp_path / name / "config.json").read_text())

    unet = config("unet")
    assert unet["_class_name"] == "UNet2DConditionModel"
    assert (unet["in_channels"], unet["sample_size"], unet["cross_attention_dim"]) == (4, 32, 64)
    assert "time_cond_proj_dim" in unet and unet["addition_embed_type"] == "text_time"
    for vae in ("vae_decoder", "vae_encoder"):
        assert config(vae)["scaling_factor"] == 0.13025
        assert config(vae)["block_out_channels"] == [16, 16, 32, 32]
    assert config("text_encoder")["num_hidden_layers"] == 3
    assert config("text_encoder_2")["projection_dim"] == 32
    # Nothing points at the exporting machine's files.
    assert not any("_name_or_path" in json.loads(p.read_text()) for p in written)


def test_model_index_refuses_a_pipeline_without_unet(tiny_pipe) -> None:
    class Released:  # what diffusers records once a module attribute is set to None
        config = {**tiny_pipe.config, "unet": (None, None)}

    with pytest.raises(ExportError, match="no UNet"):
        model_index(Released())


def test_tokenizer_files_for_both_transformers_majors(tiny_pipe, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    save_tokenizer(tiny_pipe.tokenizer, tmp_path)
    assert all((tmp_path / name).is_file() for name in TOKENIZER_FILES)
    assert (tmp_path / "merges.txt").read_text().startswith("#version:")
    # The vocabulary files alone (what transformers 4.x's CLIPTokenizer reads) and
    # tokenizer.json alone give the original tokenizer's ids.
    from_vocab = CLIPTokenizer(
        vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt")
    )
    tokenizer_json_only = tmp_path / "json-only"
    tokenizer_json_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer_json_only / name).write_bytes((tmp_path / name).read_bytes())
    from_json = CLIPTokenizer.from_pretrained(tokenizer_json_only)
    for prompt in PROMPTS:
        expected = tiny_pipe.tokenizer(prompt).input_ids
        assert from_vocab(prompt).input_ids == expected
        assert from_json(prompt).input_ids == expected
