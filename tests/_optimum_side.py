"""Run Hugging Face Optimum's SDXL pipeline on an export folder; runs in Optimum's side venv.

Optimum pins transformers<4.58, which the main install cannot use, so tests/test_optimum.py
runs this file with the interpreter of a side venv (tests/_venvs.py) and compares the results in
the main process. It imports nothing from maskattn_deploy (not installed there).

    python _optimum_side.py REQUEST.json

REQUEST: ``export_dir``, ``out`` (a .npz to write), ``prompt``, ``negative_prompt`` (null:
none), ``seed``, ``steps``, ``guidance``, ``height``, ``width``, and ``unet_inputs`` (a .npz with
``sample``, ``timestep`` (0-d, as diffusers passes it), ``encoder_hidden_states``,
``text_embeds``, ``time_ids``). The .npz holds ``image`` (uint8 HxWx3, Optimum's PIL output),
``latents`` (the final latents, fp32), ``unet_out`` (Optimum's UNet on ``unet_inputs``, fp32),
``tokenizer_ids`` / ``tokenizer_2_ids`` (the prompt padded to 77 tokens by each of Optimum's
tokenizers) and ``versions`` (JSON text).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

PACKAGES = (
    "optimum-onnx",
    "optimum",
    "transformers",
    "huggingface_hub",
    "diffusers",
    "onnxruntime",
)


def generate(pipe, request: dict) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, final latents) of one text-to-image call."""
    final = {}

    def keep_latents(_pipe, _step, _t, kwargs):
        final["latents"] = kwargs["latents"].float().numpy().copy()
        return kwargs

    result = pipe(
        request["prompt"],
        negative_prompt=request["negative_prompt"],
        num_inference_steps=request["steps"],
        guidance_scale=request["guidance"],
        height=request["height"],
        width=request["width"],
        generator=torch.Generator("cpu").manual_seed(request["seed"]),
        callback_on_step_end=keep_latents,
        callback_on_step_end_tensor_inputs=["latents"],
        output_type="pil",
    )
    return np.asarray(result.images[0].convert("RGB")), final["latents"]


def run_unet(pipe, path: str) -> np.ndarray:
    """Optimum's UNet wrapper on saved inputs, called the way the SDXL pipeline calls it."""
    with np.load(path) as data:
        feed = {name: torch.from_numpy(data[name]) for name in data.files}
    out = pipe.unet(
        feed["sample"],
        feed["timestep"],
        encoder_hidden_states=feed["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]},
        return_dict=False,
    )[0]
    return out.float().numpy()


def main() -> None:
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    request = json.loads(Path(sys.argv[1]).read_text())
    pipe = ORTStableDiffusionXLPipeline.from_pretrained(request["export_dir"])
    pipe.set_progress_bar_config(disable=True)
    image, latents = generate(pipe, request)
    unet_out = run_unet(pipe, request["unet_inputs"])
    ids = {
        f"{name}_ids": np.asarray(
            getattr(pipe, name)(request["prompt"], padding="max_length", max_length=77).input_ids
        )
        for name in ("tokenizer", "tokenizer_2")
    }
    versions = json.dumps({name: version(name) for name in PACKAGES})
    np.savez(
        request["out"], image=image, latents=latents, unet_out=unet_out, versions=versions, **ids
    )


if __name__ == "__main__":
    main()
