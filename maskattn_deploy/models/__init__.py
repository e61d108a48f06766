"""Model loading: SDXL from a hub id, a folder or a single file, and the built-in tiny model."""

from maskattn_deploy.models.fingerprint import unet_fingerprint
from maskattn_deploy.models.loader import load_pipeline

__all__ = ["load_pipeline", "unet_fingerprint"]
