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

Each component's tensors (names, axes, dtypes) are its spec's:
:mod:`maskattn_deploy.export.component_spec`. This module holds the folder layout and the
shape facts every other module imports (the latent factor, the text length, the axis symbols).
"""

from __future__ import annotations

from typing import Any

# The manifest's format: name/version. Version 2: validation checks are parity verdicts;
# ExportFolder.open migrates version-1 manifests (maskattn_deploy.export.folder.MIGRATIONS).
EXPORT_FORMAT_NAME = "maskattn-deploy-export"
EXPORT_FORMAT_VERSION = 2
EXPORT_FORMAT = f"{EXPORT_FORMAT_NAME}/{EXPORT_FORMAT_VERSION}"
# Bumped whenever the exported graphs change for the same model and gates (for example the
# masked-softmax decomposition, the Optimum-compatible encoder outputs and timestep axis of
# revision 3, or the text MLP computed once per shared gate head in revision 4), so cached
# exports made by an older version are not reused.
GRAPH_REVISION = 4
MANIFEST_NAME = "manifest.json"
MODEL_FILE = "model.onnx"
ENGINES_DIR = "engines"

# Names of the optional per-layer outputs added by ``--per-layer`` exports for localisation.
PER_LAYER_OUTPUT_PREFIX = "probs/"

# --- shapes --------------------------------------------------------------------------------
# Pixel sizes are multiples of 64, so latents (pixels / 8) are multiples of 8: SDXL's UNet
# downsamples latents twice and diffusers' SDXL resolutions (1024, 896x1152, ...) all are.
LATENT_FACTOR = 8
PIXEL_MULTIPLE = 64


def pixel_multiple(unet_config: Any) -> int:
    """The pixel sizes a UNet runs at are multiples of this: the latent factor times the
    UNet's downsampling (2 per down block after the first; SDXL's 3 blocks: 4, so 32 px).
    Other sizes reach a skip connection with mismatched shapes (exported graphs fail there)."""
    blocks = len(unet_config["block_out_channels"])
    return LATENT_FACTOR * 2 ** max(blocks - 1, 0)


TEXT_TOKENS = 77

# Symbolic axis names used in the ONNX graphs' inputs/outputs and in the manifest: B batch
# (UNet rows; CFG doubles it), h/w latent height/width, H/W pixel height/width, S the UNet's
# timesteps (1, broadcast to the batch inside the graph, or one per row). Text tokens are
# static (TEXT_TOKENS), channel and embedding widths are the model's.
BATCH, LATENT_H, LATENT_W, PIXEL_H, PIXEL_W = "B", "h", "w", "H", "W"
STEPS = "S"

# --- files ---------------------------------------------------------------------------------
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data
# Protobuf cannot serialise a message over 2 GiB; weights above this go to external data.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2_000_000_000
CONFIG_DIRS = ("tokenizer", "tokenizer_2", "scheduler")


def component_dir(component: str) -> str:
    """Sub-folder of a component: ``unet`` -> ``unet``."""
    return component


def model_relpath(component: str) -> str:
    """``unet`` -> ``unet/model.onnx`` (POSIX separators, as recorded in the manifest)."""
    return f"{component_dir(component)}/{MODEL_FILE}"


def per_layer_output(layer: str) -> str:
    """Name of the extra output holding ``layer``'s masked-softmax probabilities."""
    return PER_LAYER_OUTPUT_PREFIX + layer
