"""Fingerprints that tie gates, exports and engines to one UNet architecture."""

from __future__ import annotations

from typing import Any

from maskattn_deploy.utils import sha256_json


def architecture_config(config: Any) -> dict[str, Any]:
    """The architecture-defining part of a diffusers config (drops private/bookkeeping keys)."""
    items = dict(config)
    return {k: v for k, v in sorted(items.items()) if not k.startswith("_")}


def unet_fingerprint(unet: Any) -> str:
    """A short hash of the UNet's architecture config (weights are not part of it)."""
    cfg = architecture_config(unet.config)
    # Tuples and lists serialize alike so a config read back from JSON keeps its fingerprint.
    return "unet-" + sha256_json(_normalise(cfg))[:16]


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
