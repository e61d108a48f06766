"""The masked-softmax contract: names shared by every implementation.

One place for the op's identity so the PyTorch custom op, the ONNX exporter (custom node
and model-local function), the Triton kernel and the TensorRT plugin cannot drift apart.
See docs/design.md section 3 for the semantics.
"""

from __future__ import annotations

# torch.library namespace/name of the custom op (exported by the dynamo exporter).
TORCH_NAMESPACE = "maskattn"
TORCH_OP_NAME = "masked_softmax"
TORCH_QUALNAME = f"{TORCH_NAMESPACE}::{TORCH_OP_NAME}"

# TensorRT Python plugin identity: the ONNX node's op_type is PLUGIN_NAME and it carries a
# string attribute plugin_namespace=PLUGIN_NAMESPACE (the TensorRT parser ignores the domain).
PLUGIN_NAMESPACE = "maskattn"
PLUGIN_NAME = "MaskedSoftmax"
PLUGIN_VERSION = "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

# ONNX domain of the custom node and of its model-local function (FunctionProto).
ONNX_DOMAIN = "maskattn"
ONNX_DOMAIN_VERSION = 1

# The fused gated-attention op (scale * q k^T -> masked softmax -> p v) and its custom ONNX
# node / TensorRT plugin, the export option --attention-node fused.
TORCH_ATTENTION_OP_NAME = "gated_attention"
TORCH_ATTENTION_QUALNAME = f"{TORCH_NAMESPACE}::{TORCH_ATTENTION_OP_NAME}"
ATTENTION_PLUGIN_NAME = "MaskedCrossAttention"
ATTENTION_PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{ATTENTION_PLUGIN_NAME}"

# Implementations of gated_attention (maskattn_deploy.ops.attention): the fused Triton kernel
# (default), PyTorch's FlexAttention, the explicit reference path.
ATTENTION_IMPLS = ("triton", "flex", "reference")
DEFAULT_ATTENTION_IMPL = "triton"

# Default threshold on the gate logit g (sigmoid(g) > 0.5  <=>  g > 0).
DEFAULT_THRESHOLD = 0.0

# Finite stand-in for -inf used only by the straight-through training path.
TRAINING_NEGATIVE_BIAS = -1.0e4
