"""MaskAttn gating for diffusers UNets: gate heads, processors, placement and checkpoints."""

from maskattn_deploy.gating.config import GateConfig
from maskattn_deploy.gating.gateset import GateSet, install_gates, installed_gates, remove_gates
from maskattn_deploy.gating.head import GateHead
from maskattn_deploy.gating.modes import AttentionImpl, Estimator, GateMode, HeadPrecision
from maskattn_deploy.gating.placement import GatedLayer, cross_attention_layers, select_layers

__all__ = [
    "AttentionImpl",
    "Estimator",
    "GateConfig",
    "GateHead",
    "GateMode",
    "GateSet",
    "GatedLayer",
    "HeadPrecision",
    "cross_attention_layers",
    "install_gates",
    "installed_gates",
    "remove_gates",
    "select_layers",
]
