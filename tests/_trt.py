"""Skip condition for tests that need TensorRT and an NVIDIA GPU (never faked)."""

from __future__ import annotations

import pytest

from maskattn_deploy.engine.cuda_check import missing_for_tensorrt

_REASON = missing_for_tensorrt()

requires_tensorrt = pytest.mark.skipif(
    _REASON is not None,
    reason=f"TensorRT not installed or no GPU here: {_REASON}",
)
