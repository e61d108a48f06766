"""Test helpers for real Triton servers (the serve command runs as a child process)."""

from __future__ import annotations

import pytest


def require_server() -> None:
    """Skip when the serve extra is missing (it is part of the dev install CI uses)."""
    from maskattn_deploy.serve.server import BundledServer, ServerError, python_lib_dir

    try:
        BundledServer.locate()
        python_lib_dir()
    except ServerError as exc:
        pytest.skip(f"no Triton server here: {exc}")
