"""maskattn-deploy: MaskAttn-SDXL gates from PyTorch training to ONNX, TensorRT and serving.

Importing the package is cheap: heavy stacks (onnxruntime, tensorrt, triton) are imported
lazily by the modules that need them.
"""

from pathlib import Path as _Path

from maskattn_deploy import _checkout

__version__ = "0.1.0"

_checkout.install(_Path(__file__).resolve().parent)
