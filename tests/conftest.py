"""Shared test set-up: offline hub, a test-local artefact cache, small thread counts."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the network or the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault(
    "MASKATTN_DEPLOY_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "tests")
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """The built-in tiny SDXL pipeline (fp32, CPU). Tests must not mutate it: copy what they change."""
    from maskattn_deploy.models import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture
def seeded() -> torch.Generator:
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_export():
    """The tiny model with its seeded gates, exported once into the test cache (fp32, ONNX).

    Shared by every test that only reads an export; copy it before changing anything in it.
    """
    from maskattn_deploy.models.tiny import tiny_default_gates_dir
    from maskattn_deploy.runtime.api import ensure_tiny_export

    path, _ = ensure_tiny_export(tiny_default_gates_dir(), say=lambda line: None)
    return path
