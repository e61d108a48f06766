"""The export folder contract shared by the exporter, the runtimes and the engine builder.

Layout (like Hugging Face Optimum's SDXL layout)::

    EXPORT_DIR/
      manifest.json            format, precision, opset, recipe shapes, components, file hashes
      unet/model.onnx          (+ model.onnx.data when weights exceed 2 GB or are forced out)
      text_encoder/model.onnx
      text_encoder_2/model.onnx
      vae_decoder/model.onnx
      vae_encoder/model.onnx   (only with --vae-encoder)
      tokenizer/ tokenizer_2/ scheduler/   copied configs
      engines/                 TensorRT engines + engine manifests (maskattn-deploy build)

Tensor names below are the I/O names of every backend (ONNX Runtime, TensorRT, torch runner).
"""

from __future__ import annotations

EXPORT_FORMAT = "maskattn-deploy-export/1"
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"
ENGINES_DIR = "engines"

# component -> (input names, output names). Symbolic dims: B batch, H/W latent height/width,
# T text tokens (77). Dtypes: float tensors follow the export precision, except timestep and
# time_ids which stay fp32 and input_ids which are int64.
COMPONENT_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # sample [B,4,H,W], timestep [B] fp32, encoder_hidden_states [B,T,E], text_embeds [B,P],
    # time_ids [B,6] fp32  ->  out_sample [B,4,H,W]
    "unet": (
        ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"),
        ("out_sample",),
    ),
    # input_ids [B,T] int64 -> penultimate hidden states [B,T,768]
    "text_encoder": (("input_ids",), ("hidden_states",)),
    # input_ids [B,T] int64 -> penultimate hidden states [B,T,1280], pooled projection [B,1280]
    "text_encoder_2": (("input_ids",), ("hidden_states", "text_embeds")),
    # latent_sample [B,4,H,W] (already divided by the VAE scaling factor) -> sample [B,3,8H,8W]
    "vae_decoder": (("latent_sample",), ("sample",)),
    # sample [B,3,8H,8W] -> latent_sample [B,4,H,W] (mean of the latent distribution)
    "vae_encoder": (("sample",), ("latent_sample",)),
}

# Names of the optional per-layer outputs added by ``--per-layer`` exports for localisation.
PER_LAYER_OUTPUT_PREFIX = "probs/"
