"""The served model's request and response: tensor names, types, and request validation.

One inference request asks for one image. Every input carries Triton's batch dimension of 1
(the server's dynamic batcher forms the batches); only ``PROMPT`` is required:

============== ======= ==========================================================
input          type    meaning
============== ======= ==========================================================
PROMPT         BYTES   UTF-8 prompt (longer than CLIP's 77 tokens: truncated, with
                       a warning in SETTINGS)
NEGATIVE_PROMPT BYTES  what to steer away from (default: empty)
SEED           INT64   noise seed (default 0); same seed, same image
STEPS          INT32   denoising steps (default: the model's, 8 for tiny)
GUIDANCE       FP32    classifier-free guidance scale (default 5.0; <= 1 turns it off)
HEIGHT, WIDTH  INT32   pixels, multiples of 8 within the export's range
SCHEDULER      BYTES   sampler name (default euler)
RETURN_MASKS   BOOL    also return the per-stage gate mask maps
============== ======= ==========================================================

Outputs (ask only for the ones you need; the rest are not computed):

================== ======= ===================================================
output             type    meaning
================== ======= ===================================================
IMAGE_PNG          BYTES   the image as PNG, with the settings in its metadata
IMAGE              UINT8   the image as ``[H, W, 3]``
SETTINGS           BYTES   JSON: the settings actually used, plus ``warnings``
TIMINGS            BYTES   JSON: per-stage seconds and the batch it ran in
GATE_LAYERS        BYTES   ``[L]`` gated layer names
GATE_OPEN_FRACTION FP32    ``[L]`` fraction of open gate entries per layer
MASKS              FP32    ``[S, T, h, w]`` open fraction per stage, token, latent
                           cell (empty unless RETURN_MASKS)
MASK_STAGES        BYTES   ``[S]`` stage names of MASKS
TOKENS             BYTES   ``[T]`` prompt token labels (start ... end)
================== ======= ===================================================

Unknown inputs, wrong types and wrong shapes are refused by Triton itself before the model
runs; the checks here refuse values (:class:`RequestError`, answered as INVALID_ARG). The
numbers go through the library's own request limits (:mod:`maskattn_deploy.runtime.limits`,
which ``GenerateConfig`` applies too), with the library's parameter names shown as fields;
only ``STEPS`` has a tighter, server-chosen bound (``--max-steps``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from maskattn_deploy.errors import UserError

MODEL_NAME = "maskattn_sdxl"

# name -> (Triton dtype, dims without the batch dimension, required)
INPUTS: dict[str, tuple[str, list[int], bool]] = {
    "PROMPT": ("TYPE_STRING", [1], True),
    "NEGATIVE_PROMPT": ("TYPE_STRING", [1], False),
    "SEED": ("TYPE_INT64", [1], False),
    "STEPS": ("TYPE_INT32", [1], False),
    "GUIDANCE": ("TYPE_FP32", [1], False),
    "HEIGHT": ("TYPE_INT32", [1], False),
    "WIDTH": ("TYPE_INT32", [1], False),
    "SCHEDULER": ("TYPE_STRING", [1], False),
    "RETURN_MASKS": ("TYPE_BOOL", [1], False),
}
# name -> (Triton dtype, dims without the batch dimension)
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "IMAGE_PNG": ("TYPE_STRING", [1]),
    "IMAGE": ("TYPE_UINT8", [-1, -1, 3]),
    "SETTINGS": ("TYPE_STRING", [1]),
    "TIMINGS": ("TYPE_STRING", [1]),
    "GATE_LAYERS": ("TYPE_STRING", [-1]),
    "GATE_OPEN_FRACTION": ("TYPE_FP32", [-1]),
    "MASKS": ("TYPE_FP32", [-1, -1, -1, -1]),
    "MASK_STAGES": ("TYPE_STRING", [-1]),
    "TOKENS": ("TYPE_STRING", [-1]),
}
# Triton dtype -> the tritonclient datatype string of the same tensor
CLIENT_DTYPES = {
    "TYPE_STRING": "BYTES",
    "TYPE_INT64": "INT64",
    "TYPE_INT32": "INT32",
    "TYPE_FP32": "FP32",
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
}
NUMPY_DTYPES = {
    "TYPE_STRING": np.object_,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_FP32": np.float32,
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
}

MAX_PROMPT_BYTES = 16384  # far beyond 77 CLIP tokens; stops a megabyte "prompt" early


class RequestError(UserError):
    """A request value the server refuses (answered with Triton's INVALID_ARG)."""


@dataclass(frozen=True)
class Limits:
    """What the server accepts besides the export's own size and batch ranges."""

    max_steps: int = 150
    default_steps: int = 8


def parse_request(fields: Mapping[str, np.ndarray], limits: Limits) -> tuple[dict, bool]:
    """Validated keyword arguments of a ``GenerateConfig`` and the RETURN_MASKS flag.

    ``fields`` maps input names to the arrays Triton delivered (batch dimension included).
    Raises :class:`RequestError` naming the field and the accepted values.
    """
    for name, value in fields.items():
        if value.shape[:1] != (1,) or value.size != 1:
            raise RequestError(
                f"{name} has shape {list(value.shape)}: send one value per request (shape [1, 1]); "
                "the server batches requests itself"
            )
    prompt = _text(fields, "PROMPT", required=True)
    if not prompt.strip():
        raise RequestError("PROMPT is empty; send a text prompt, e.g. 'a red square'")
    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": _text(fields, "NEGATIVE_PROMPT"),
        "seed": _integer(fields, "SEED", 0),
        "steps": _integer(fields, "STEPS", limits.default_steps),
        "guidance": _number(fields, "GUIDANCE", 5.0),
        "scheduler": _text(fields, "SCHEDULER") or "euler",
    }
    for name in ("HEIGHT", "WIDTH"):
        if name in fields:
            kwargs[name.lower()] = _integer(fields, name, 0)
    _check_numbers(kwargs, limits)
    return kwargs, bool(_scalar(fields, "RETURN_MASKS", False))


def _check_numbers(kwargs: dict[str, Any], limits: Limits) -> None:
    """The library's request limits (runtime.limits), STEPS within the server's --max-steps."""
    from maskattn_deploy.checks import check_int
    from maskattn_deploy.runtime.limits import check_request

    try:
        check_int("steps", kwargs["steps"], 1, limits.max_steps, hint=" (the server's --max-steps)")
        check_request(
            None,  # steps: checked above, against a bound no larger than the library's
            kwargs["guidance"],
            kwargs["seed"],
            1,
            kwargs.get("height"),
            kwargs.get("width"),
        )
    except UserError as exc:
        raise RequestError(field_message(exc)) from None


def field_message(exc: UserError) -> str:
    """A library message with its parameter names shown as request fields (height -> HEIGHT)."""
    fields = {name.lower(): name for name in INPUTS}
    return exc.message_for(lambda param: fields.get(param))


def _scalar(fields: Mapping[str, np.ndarray], name: str, default: Any) -> Any:
    value = fields.get(name)
    return default if value is None else value.reshape(-1)[0]


def _text(fields: Mapping[str, np.ndarray], name: str, required: bool = False) -> str:
    value = _scalar(fields, name, None)
    if value is None:
        if required:
            raise RequestError(f"{name} is required")
        return ""
    raw = value if isinstance(value, bytes) else str(value).encode()
    if len(raw) > MAX_PROMPT_BYTES:
        raise RequestError(f"{name} is {len(raw)} bytes; send at most {MAX_PROMPT_BYTES}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{name} is not valid UTF-8 text") from None


def _integer(fields: Mapping[str, np.ndarray], name: str, default: int) -> int:
    return int(_scalar(fields, name, default))


def _number(fields: Mapping[str, np.ndarray], name: str, default: float) -> float:
    return float(_scalar(fields, name, default))
