"""The captioner: vision encoder, CoCa-style text decoder, DeepSeek-style MoE. Never imports
DeepSpeed; distribution is applied from :mod:`fastcap.train`."""

from fastcap.model.captioner import Captioner, lm_targets, mix_inputs, param_count
from fastcap.model.config import ModelConfig, MoEConfig
from fastcap.model.moe import MoE

__all__ = [
    "Captioner",
    "ModelConfig",
    "MoEConfig",
    "MoE",
    "lm_targets",
    "mix_inputs",
    "param_count",
]
