"""DeepSeek-style MoE feed-forward: shared experts always on + fine-grained routed experts.

The routed experts are stacked weights in one module (ZeRO-3 treats it as a leaf: which
experts run depends on the data, so per-expert sub-modules would desynchronise parameter
gathering across ranks). Dispatch and combine go through :func:`fastcap.ops.moe_ffn`.
Router math (logits, softmax, top-k, balance statistics) runs in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from fastcap.model.config import MoEConfig
from fastcap.model.layers import SwiGLU
from fastcap.ops import moe_ffn


class MoE(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, f = cfg.num_experts, cfg.expert_hidden
        self.router = nn.Parameter(torch.empty(E, dim))
        self.w13 = nn.Parameter(torch.empty(E, dim, 2 * f))  # gate | up
        self.w2 = nn.Parameter(torch.empty(E, f, dim))
        self.shared = SwiGLU(dim, cfg.num_shared * f) if cfg.num_shared > 0 else None
        nn.init.normal_(self.router, std=dim**-0.5)
        nn.init.normal_(self.w13, std=dim**-0.5)
        nn.init.normal_(self.w2, std=f**-0.5)
        # statistics of the last forward, for logging (detached)
        self.last_load: Tensor | None = None  # (E,) share of routed choices per expert
        self.last_entropy: Tensor | None = None  # mean router entropy, nats

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (T, d) real tokens only -> (out (T, d), balance loss 0-d fp32)."""
        T = x.shape[0]
        E, k = self.cfg.num_experts, self.cfg.top_k
        logits = x.float() @ self.router.float().T  # (T, E) fp32
        scores = logits.softmax(dim=-1)
        weights, ids = scores.topk(k, dim=-1)  # (T, k); DeepSeekMoE: gates not renormalised
        out = moe_ffn(x, self.w13, self.w2, ids, weights.to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        # expert-level balance loss (DeepSeekMoE eq. 12-14): alpha * sum_i f_i P_i,
        # f_i = E / (k T) * #tokens choosing i, P_i = mean_t s_{i,t}; 1.0*alpha when uniform
        counts = torch.bincount(ids.flatten(), minlength=E).float()
        # sums over max(T, 1) as torch.sym_max, not a Python max or branch on T: the routed
        # token count is data-dependent (padding removed) under torch.compile and in the
        # fake-CUDA runs, where a Python comparison of it cannot be decided
        # (tests/test_custom_ops.py, tests/test_fake_cuda.py)
        n = torch.sym_max(T, 1)
        f_i = counts * E / (k * n)
        p_i = scores.sum(dim=0) / n
        aux = self.cfg.aux_alpha * (f_i * p_i).sum()
        with torch.no_grad():
            self.last_load = counts / counts.sum().clamp(min=1)
            ent = -(scores * scores.clamp(min=1e-9).log()).sum(-1)
            self.last_entropy = ent.sum() / n / math.log(E)
        return out, aux
