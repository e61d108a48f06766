"""The masked-softmax op: contract, reference oracle and the torch custom op."""

from maskattn_deploy.ops.contract import DEFAULT_THRESHOLD, PLUGIN_NAME, PLUGIN_NAMESPACE
from maskattn_deploy.ops.reference import check_shapes, masked_softmax_reference, open_mask

__all__ = [
    "DEFAULT_THRESHOLD",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "check_shapes",
    "masked_softmax_reference",
    "open_mask",
]
