"""Applied from the training side, never inside the model: activation checkpointing."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fastcap.model.decoder import DecoderLayer
from fastcap.model.layers import EncoderLayer


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every Transformer layer's activations in backward instead of storing them.

    Without grad (evaluation) layers run normally; decoding never goes through ``forward``
    (it uses ``DecoderLayer.step``). Returns the number of layers wrapped.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, (EncoderLayer, DecoderLayer)) and not hasattr(m, "_fastcap_ckpt"):
            inner = m.forward

            def wrapped(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            m.forward = wrapped
            m._fastcap_ckpt = True
            n += 1
    return n
