"""CoCa-style text decoder: unimodal causal layers (RoPE), then multimodal layers that add
cross-attention to the image tokens. RMSNorm, SwiGLU or MoE feed-forward, tied embeddings.

Padding is handled only through ``kv_lens`` (keys past a sequence's length are never attended)
and by excluding pad positions from the MoE router and from every loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fastcap.model.config import ModelConfig
from fastcap.model.layers import Attention, KVCache, RMSNorm, SwiGLU
from fastcap.model.moe import MoE


def _dropout(p: float) -> nn.Module:
    """model.dropout's module: Identity at 0, so a run without dropout computes exactly what it
    did before the option existed (no mask multiply)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, cross: bool, moe: bool):
        super().__init__()
        d = cfg.width
        self.rope_theta = cfg.rope_theta
        self.norm1 = RMSNorm(d)
        self.self_attn = Attention(d, cfg.heads)
        self.norm_c = RMSNorm(d) if cross else None
        self.cross_attn = Attention(d, cfg.heads, cross=True) if cross else None
        self.norm2 = RMSNorm(d)
        self.ffn = MoE(d, cfg.moe) if moe else SwiGLU(d, cfg.ffn_hidden)
        self.drop = _dropout(cfg.dropout)  # residual branches, training only

    def forward(
        self,
        x: Tensor,
        *,
        kv_lens: Tensor,
        valid: Tensor,
        img_kv: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor]:
        """x (B, L, d); ``valid`` (B, L) bool marks real tokens. Returns (x, aux loss)."""
        h = self.norm1(x)
        drop = self.drop
        x = x + drop(self.self_attn(h, causal=True, kv_lens=kv_lens, rope_theta=self.rope_theta))
        if self.cross_attn is not None:
            x = x + drop(self.cross_attn(self.norm_c(x), kv=img_kv))
        h = self.norm2(x)
        if isinstance(self.ffn, MoE):
            # route real tokens only: padding neither costs expert work nor skews the balance
            out = torch.zeros_like(h)
            y, aux = self.ffn(h[valid])
            out[valid] = y
            return x + drop(out), aux
        return x + drop(self.ffn(h)), x.new_zeros((), dtype=torch.float32)

    def step(self, x: Tensor, img_kv: tuple[Tensor, Tensor] | None, cache: KVCache) -> Tensor:
        """One decoding step: the new positions x (B, L, d) against ``cache`` -> (B, L, d).

        :meth:`forward`'s arithmetic, op for op, for rows that hold every position (no padding
        mask, no aux loss), calling the submodules' ``forward`` and weights directly: a decoding
        copy runs no hooks, and the module calls measured a twentieth of a CPU step.
        """
        h = self.norm1.forward(x)
        x = x + self.self_attn.decode_self(h, cache, self.rope_theta)
        if self.cross_attn is not None:
            x = x + self.cross_attn.decode_cross(self.norm_c.forward(x), img_kv, cache.attend)
        h = self.norm2.forward(x)
        if isinstance(self.ffn, MoE):
            y, _ = self.ffn(h.reshape(-1, h.shape[-1]))
            return x + y.view_as(h)
        return x + self.ffn.decode(h)


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        nn.init.normal_(self.embed.weight, std=cfg.width**-0.5)
        n_uni = cfg.unimodal_layers
        layers = []
        for i in range(n_uni + cfg.multimodal_layers):
            moe = cfg.moe.enabled and not (cfg.moe.first_dense and i == 0)
            layers.append(DecoderLayer(cfg, cross=i >= n_uni, moe=moe))
        self.layers = nn.ModuleList(layers)
        self.text_norm = RMSNorm(cfg.width)
        self.text_embed = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        self.norm = RMSNorm(cfg.width)
        self.drop = _dropout(cfg.dropout)  # on the token embeddings, training only

    @property
    def cross_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.layers if layer.cross_attn is not None]

    def image_kv(self, img_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values of every multimodal layer: projected once per image."""
        return [layer.cross_attn.project_kv(img_tokens) for layer in self.cross_layers]

    def forward(
        self,
        tokens: Tensor,
        kv_lens: Tensor,
        img_kv: list[tuple[Tensor, Tensor]],
        cache: list[KVCache] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """tokens (B, L) -> (final hidden (B, L, d) normed, unimodal hidden (B, L, d), aux).

        ``kv_lens`` (B,) counts real keys. ``img_kv`` may hold one row per group of rows (see
        ``Attention.forward``). With ``cache`` (one :class:`KVCache` per layer, from
        :meth:`new_cache`), ``tokens`` are only the new positions, every row holds every
        position (``kv_lens`` must be None), and the aux loss is 0.
        """
        if cache is not None:
            if kv_lens is not None:
                raise ValueError(
                    "decoding with a cache: every row holds every position, no kv_lens"
                )
            return self._step(tokens, img_kv, cache)
        B, L = tokens.shape
        pos = torch.arange(L, device=tokens.device)
        valid = pos[None, :] < kv_lens[:, None]  # (B, L)
        x = self.drop(self.embed(tokens))
        aux = x.new_zeros((), dtype=torch.float32)
        uni = x
        n_uni = self.cfg.unimodal_layers
        kv_iter = iter(img_kv)
        for i, layer in enumerate(self.layers):
            kv = next(kv_iter) if layer.cross_attn is not None else None
            x, a = layer(
                x,
                kv_lens=kv_lens,
                valid=valid,
                img_kv=kv,
            )
            aux = aux + a
            if i == n_uni - 1:
                uni = x
        return self.norm(x), uni, aux

    def _step(self, tokens: Tensor, img_kv, cache: list[KVCache]) -> tuple[Tensor, Tensor, Tensor]:
        x = self.embed(tokens)
        uni = x
        kv_iter = iter(img_kv)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, next(kv_iter) if layer.cross_attn is not None else None, cache[i])
            if i == self.cfg.unimodal_layers - 1:
                uni = x
        return self.norm(x), uni, x.new_zeros((), dtype=torch.float32)

    def new_cache(
        self, capacity: int, device: torch.device | str, static: bool = False
    ) -> list[KVCache]:
        """An empty self-attention cache per layer for up to ``capacity`` tokens on ``device``.

        ``static``: the layers share one device position (``cache[0].pos``, starting at 0) that
        the caller advances after each step (see :class:`KVCache`); not with MoE layers, whose
        routing has data-dependent shapes.
        """
        pos = None
        if static:
            if any(isinstance(layer.ffn, MoE) for layer in self.layers):
                raise ValueError("static decoding needs dense layers: MoE routing changes shapes")
            pos = torch.zeros(1, dtype=torch.long, device=device)
        return [KVCache(capacity, device, pos) for _ in self.layers]

    def unimodal(self, tokens: Tensor, lens: Tensor) -> Tensor:
        """The unimodal layers alone over full sequences (B, L) -> (B, L, d): the text tower."""
        L = tokens.shape[1]
        valid = torch.arange(L, device=tokens.device)[None, :] < lens[:, None]
        x = self.drop(self.embed(tokens))
        for layer in self.layers[: self.cfg.unimodal_layers]:
            x, _ = layer(x, kv_lens=lens, valid=valid, img_kv=None)
        return x

    def text_embedding(self, uni: Tensor, lens: Tensor) -> Tensor:
        """Unimodal state at the end-of-text position lens - 1 -> (B, embed_dim)."""
        last = uni[torch.arange(uni.shape[0], device=uni.device), lens - 1]
        return self.text_embed(self.text_norm(last))
