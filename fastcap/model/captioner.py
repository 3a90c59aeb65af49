"""The captioner: vision encoder + CoCa-style decoder, with every loss computed in forward
(ZeRO-3 gathers parameters inside the engine's forward, so the LM head and the contrastive
head must be used there).

Sequences are ``tokens`` (B, L) = [bos, caption..., eos, pad...] with ``lens`` (B,) real tokens
(bos and eos included). Position i predicts token i + 1; the eos position predicts nothing and
its unimodal state is the text embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastcap.model.config import ModelConfig
from fastcap.model.decoder import TextDecoder
from fastcap.model.layers import Attention
from fastcap.model.moe import MoE
from fastcap.model.vision import VisionEncoder
from fastcap.ops import linear_cross_entropy, siglip_loss_distributed

IGNORE = -100


def lm_targets(tokens: Tensor, lens: Tensor) -> Tensor:
    """(B, L) targets: tokens shifted left, IGNORE at and after the eos position."""
    B, L = tokens.shape
    tgt = torch.full_like(tokens, IGNORE)
    tgt[:, :-1] = tokens[:, 1:]
    pos = torch.arange(L, device=tokens.device)
    return tgt.masked_fill(pos[None, :] >= (lens[:, None] - 1), IGNORE)


def mix_inputs(
    gold: Tensor, pred: Tensor, lens: Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Scheduled-sampling inputs: at each caption position 1..len-2 read the gold token with
    probability p, else the model's own prediction ``pred`` (B, L) for that position.

    bos (position 0), eos (position len-1) and padding always stay gold. Returns the mixed
    tokens and the boolean (B, L) mask of positions that read a prediction.
    """
    B, L = gold.shape
    pos = torch.arange(L, device=gold.device)
    eligible = (pos[None, :] >= 1) & (pos[None, :] < lens[:, None] - 1)
    u = torch.rand(B, L, generator=generator, device="cpu").to(gold.device)
    use_pred = eligible & (u >= p)
    return torch.where(use_pred, pred, gold), use_pred


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.decoder = TextDecoder(cfg)
        # shape (1,), not 0-d: DeepSpeed broadcasts parameters as bytes, which 0-d cannot be
        self.logit_scale = nn.Parameter(torch.tensor([cfg.siglip_scale_init]))
        self.logit_bias = nn.Parameter(torch.tensor([cfg.siglip_bias_init]))

    # ------------------------------------------------------------------ pieces used by decoding
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, S, S) -> image tokens (B, N, d), pooled embedding (B, embed_dim)."""
        return self.vision(images)

    def image_kv(self, img_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        return self.decoder.image_kv(img_tokens)

    def contrastive_scale(self) -> Tensor:
        """0-d log temperature, clamped at log(siglip_scale_max): unbounded, exp(t) overflows
        the logits (CLIP clamps at 100 for the same reason). Above the bound its gradient is 0.
        """
        return self.logit_scale[0].clamp(max=math.log(self.cfg.siglip_scale_max))

    def logits(self, h: Tensor) -> Tensor:
        """Tied output head: (..., d) -> (..., V) in fp32."""
        return (h @ self.decoder.embed.weight.T).float()

    def decode(self, tokens: Tensor, kv_lens: Tensor, img_kv, cache=None):
        """Decoder hidden states; see :meth:`TextDecoder.forward`."""
        return self.decoder(tokens, kv_lens, img_kv, cache)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        images: Tensor,
        tokens: Tensor,
        lens: Tensor,
        tf_p: float = 1.0,
        generator: torch.Generator | None = None,
        capture: bool = False,
        objective=None,
    ) -> dict[str, Tensor]:
        """Losses of one batch.

        Args:
            images: (B, 3, S, S) normalised images.
            tokens: (B, L) [bos, caption, eos, pad...]; lens: (B,) real lengths.
            tf_p: scheduled teacher forcing: probability of reading the gold token. Below 1 a
                no-grad first pass on gold inputs supplies the model's own predictions.
            generator: CPU generator for the teacher-forcing draws (part of the resumable state).
            capture: also return diagnostics (activation RMS, attention and router entropy).
            objective: a training objective defined outside the model, called as
                ``objective(self, images)`` instead of the cross-entropy losses (``tokens``,
                ``lens`` unused): it runs here, inside the engine's forward, where ZeRO-3 has
                gathered the parameters. SCST is one (:mod:`fastcap.train.scst`).

        Returns:
            dict with ``loss`` (the total, differentiable), ``ce``, ``clip``, ``aux`` (detached
            terms), ``tf_pred`` (share of caption inputs that read a prediction) and, with
            ``capture``, ``diag/...`` entries.
        """
        if objective is not None:
            return objective(self, images)
        cfg = self.cfg
        if capture:
            self._set_capture(True)
        img_tokens, img_emb = self.encode_image(images)
        img_kv = self.image_kv(img_tokens)
        tgt = lm_targets(tokens, lens)
        inputs, n_pred = tokens, tokens.new_zeros(())
        if tf_p < 1.0:
            with torch.no_grad():
                self._set_capture(False, clear=False)
                h0, _, _ = self.decode(tokens, lens, [(k.detach(), v.detach()) for k, v in img_kv])
                pred = self.logits(h0).argmax(-1)  # (B, L): prediction for position i + 1
            pred = torch.cat([tokens[:, :1], pred[:, :-1]], dim=1)  # align to input positions
            inputs, used = mix_inputs(tokens, pred, lens, tf_p, generator)
            n_pred = used.sum()
            self._set_capture(capture, clear=False)
        h, uni, aux = self.decode(inputs, lens, img_kv)
        mask = tgt != IGNORE
        ce = linear_cross_entropy(
            h[mask], self.decoder.embed.weight, tgt[mask], label_smoothing=cfg.label_smoothing
        )
        if tf_p < 1.0:
            # the text tower reads the gold caption: the mixed inputs hold tokens predicted
            # from the image, through which the contrastive loss could copy the image
            uni = self.decoder.unimodal(tokens, lens)
        txt_emb = self.decoder.text_embedding(uni, lens)
        img_n, txt_n = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
        scale = self.contrastive_scale()
        # with data-parallel ranks: this rank's images against every rank's texts, divided by
        # the local batch, so the engine's gradient average weighs it like one process's loss
        clip = siglip_loss_distributed(img_n, txt_n, scale, self.logit_bias[0], mean_over="local")
        loss = ce + cfg.lambda_clip * clip + cfg.lambda_aux * aux
        n_caption = (lens - 2).clamp(min=0).sum().clamp(min=1)
        out = {
            "loss": loss,
            "ce": ce.detach(),
            "clip": clip.detach(),
            "aux": aux.detach(),
            "tf_pred": (n_pred.float() / n_caption).detach(),
            "logit_scale": scale.detach().clone(),
        }
        if capture:
            out.update(self._diagnostics(img_tokens, h, lens))
            self._set_capture(False)
        return out

    # ------------------------------------------------------------------ instruments
    def _set_capture(self, on: bool, clear: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.capture = on
                if clear and not on:
                    m.last_probs = None

    @torch.no_grad()
    def _diagnostics(self, img_tokens: Tensor, h: Tensor, lens: Tensor) -> dict[str, Tensor]:
        """Per-layer attention entropy (normalised by log of the keys seen), router entropy and
        load, activation RMS of the final states: the instruments that show a collapsed or
        leaking model early."""
        out: dict[str, Tensor] = {}
        L = h.shape[1]
        qmask = torch.arange(L, device=h.device)[None, :] < lens[:, None]  # (B, L)
        out["diag/act_rms/image_tokens"] = img_tokens.float().pow(2).mean().sqrt()
        out["diag/act_rms/decoder_out"] = h[qmask].float().pow(2).mean().sqrt()
        for i, layer in enumerate(self.vision.layers):
            out[f"diag/attn_entropy/enc{i}"] = _entropy(layer.attn.last_probs, None)
        for i, layer in enumerate(self.decoder.layers):
            out[f"diag/attn_entropy/self{i}"] = _entropy(layer.self_attn.last_probs, qmask)
            if layer.cross_attn is not None:
                out[f"diag/attn_entropy/cross{i}"] = _entropy(layer.cross_attn.last_probs, qmask)
            if isinstance(layer.ffn, MoE):
                out[f"diag/router_entropy/dec{i}"] = layer.ffn.last_entropy
                out[f"diag/expert_load_max/dec{i}"] = layer.ffn.last_load.max()
        return out


def _entropy(p: Tensor | None, qmask: Tensor | None) -> Tensor:
    """Mean over real query rows of H(row) / log(#keys the row sees), in [0, 1]."""
    if p is None:
        return torch.tensor(float("nan"))
    ent = -(p * p.clamp(min=1e-12).log()).sum(-1)  # (B, H, Lq)
    seen = (p > 0).sum(-1).clamp(min=2).float()
    ent = ent / seen.log()
    if qmask is None:
        return ent.mean()
    return ent.mean(1)[qmask].mean()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
