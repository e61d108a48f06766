"""maskattn-deploy: MaskAttn-SDXL gates from PyTorch training to ONNX, TensorRT and serving.

Importing the package is cheap: heavy stacks (onnxruntime, tensorrt, triton) are imported
lazily by the modules that need them.
"""

__version__ = "0.1.0"
