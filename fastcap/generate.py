"""Caption decoding with a KV cache: the image keys/values of every cross-attention layer are
projected once per image; self-attention keys/values are cached and extended one token a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Generated:
    tokens: Tensor  # (B, T) generated ids after bos, eos included, pad after it
    lens: Tensor  # (B,) generated tokens up to and including eos (T if none)
    scores: Tensor  # (B,) sum of log-probabilities of the generated tokens


@torch.inference_mode()
def greedy(model, images: Tensor, *, max_new_tokens: int = 30) -> Generated:
    """Greedy decoding of a batch of normalised images (B, 3, S, S)."""
    cfg = model.cfg
    B = images.shape[0]
    dev = images.device
    img_tokens, _ = model.encode_image(images)
    img_kv = model.image_kv(img_tokens)
    cache = [{} for _ in model.decoder.layers]
    step_in = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=dev)
    out = torch.full((B, max_new_tokens), cfg.pad_id, dtype=torch.long, device=dev)
    scores = torch.zeros(B, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    lens = torch.full((B,), max_new_tokens, dtype=torch.long, device=dev)
    for t in range(max_new_tokens):
        kv_lens = torch.full((B,), t + 1, dtype=torch.long, device=dev)
        h, _, _ = model.decode(step_in, kv_lens, img_kv, cache)
        logp = model.logits(h[:, -1]).log_softmax(-1)  # (B, V)
        nxt = logp.argmax(-1)
        scores += torch.where(done, 0.0, logp.gather(1, nxt[:, None]).squeeze(1))
        nxt = torch.where(done, cfg.pad_id, nxt)
        out[:, t] = nxt
        newly = ~done & (nxt == cfg.eos_id)
        lens = torch.where(newly, t + 1, lens)
        done |= newly
        if bool(done.all()):
            out = out[:, : t + 1]
            break
        step_in = nxt[:, None]
    return Generated(out, lens, scores)


def decode_texts(tokenizer, gen: Generated) -> list[str]:
    return [tokenizer.decode(row[: int(n)].tolist()) for row, n in zip(gen.tokens, gen.lens)]
