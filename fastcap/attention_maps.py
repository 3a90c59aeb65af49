"""Cross-attention maps of a caption, drawn with PIL (no matplotlib): for ``--attention-maps``.

Per image one PNG: the image upscaled with its caption underneath, then one tile per generated
word, the image under a heat-map of where the decoder looked while writing that word.

The maps come from a teacher-forced pass over [bos, caption] with probabilities captured in
every cross-attention layer; the query at position i is the one that predicted token i + 1.
A word's map is the mean over its BPE tokens, the heads and the cross-attention layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

TILE = 112  # px of one word tile
MAIN = 256  # px of the upscaled image
COLS = 6  # word tiles per row


@torch.inference_mode()
def cross_attention_maps(model, images: Tensor, tokens: Tensor, lens: Tensor) -> Tensor:
    """Attention over the image grid while generating each token.

    images (B, 3, S, S) uint8 (the model normalises); tokens (B, T) generated ids (eos
    included, pad after); lens (B,) generated lengths. Returns (B, T, g, g) fp32, each row
    summing to 1 over the g x g image tokens (rows past a caption's length are zero).
    """
    cfg = model.cfg
    B, T = tokens.shape
    img_tokens, _ = model.encode_image(images)  # uint8 or float: the encoder casts
    img_kv = model.image_kv(img_tokens)
    bos = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=tokens.device)
    inputs = torch.cat([bos, tokens[:, :-1]], dim=1)  # position i predicts tokens[:, i]
    layers = [layer.cross_attn for layer in model.decoder.cross_layers]
    for a in layers:
        a.capture = True
    try:
        model.decode(inputs, lens.clamp(min=1), img_kv)
        probs = torch.stack([a.last_probs for a in layers]).mean(dim=(0, 2))  # (B, T, N)
    finally:
        for a in layers:
            a.capture, a.last_probs = False, None
    N = probs.shape[-1]
    g = math.isqrt(N)
    live = torch.arange(T, device=tokens.device)[None, :] < lens[:, None]
    return (probs.float() * live[:, :, None]).view(B, T, g, g)


def word_spans(tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """Group BPE token positions into words: [(word, [positions])], eos and specials dropped.

    A token starts a new word when decoding it adds a space before it (byte-level BPE marks
    word starts with a leading space).
    """
    spans: list[tuple[str, list[int]]] = []
    prev = ""
    space = True  # a space token on its own (small vocabularies have them) starts a word too
    pending: list[int] = []  # such space tokens, attributed to the word they start
    for i, t in enumerate(ids):
        if t == tokenizer.eos_id:
            break
        text = tokenizer.decode(ids[: i + 1])
        piece = text[len(prev) :]
        prev = text
        if not piece.strip():
            space = space or bool(piece)
            pending.append(i)
            continue
        if not spans or space or piece[0].isspace():
            spans.append((piece.strip(), pending + [i]))
        else:
            word, pos = spans[-1]
            spans[-1] = (word + piece.rstrip(), pos + pending + [i])
        pending = []
        space = piece[-1].isspace()
    return spans


def _heat_rgb(a: np.ndarray) -> np.ndarray:
    """(h, w) in [0, 1] -> (h, w, 3) uint8, a blue-cyan-yellow-red ramp."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    x = np.clip(a, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(np.int64), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def _overlay(base: Image.Image, amap: np.ndarray, size: int) -> Image.Image:
    # min-max per word: the maps of an untrained or diffuse head are near uniform, and only
    # the contrast within one map says where the word looked
    lo, hi = float(amap.min()), float(amap.max())
    amap = (amap - lo) / max(hi - lo, 1e-12)
    heat = Image.fromarray((amap * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    rgb = Image.fromarray(_heat_rgb(np.asarray(heat, dtype=np.float32) / 255))
    return Image.blend(base.resize((size, size), Image.BICUBIC), rgb, 0.45)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for w in text.split():
        trial = f"{cur} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    return lines + [cur] if cur else lines or [""]


def render(
    image: Image.Image, caption: str, words: list[tuple[str, np.ndarray]], path: str | Path
) -> Path:
    """Write the PNG: ``image`` (RGB, any size) upscaled, ``caption`` under it, then one tile
    per (word, g x g attention map)."""
    font = ImageFont.load_default(size=16)
    small = ImageFont.load_default(size=13)
    width = max(MAIN, COLS * TILE) + 16
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cap_lines = _wrap(probe, caption, font, width - 16)
    rows = math.ceil(len(words) / COLS)
    height = 8 + MAIN + 8 + 20 * len(cap_lines) + 8 + rows * (TILE + 20) + 8
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    canvas.paste(image.resize((MAIN, MAIN), Image.BICUBIC), ((width - MAIN) // 2, 8))
    y = 8 + MAIN + 8
    for line in cap_lines:
        draw.text((8, y), line, fill="black", font=font)
        y += 20
    y += 8
    for j, (word, amap) in enumerate(words):
        x0 = 8 + (j % COLS) * TILE
        y0 = y + (j // COLS) * (TILE + 20)
        canvas.paste(_overlay(image, amap, TILE - 4), (x0, y0))
        draw.text((x0, y0 + TILE - 2), word[:14], fill="black", font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_maps(
    model,
    tokenizer,
    images: Tensor,
    display: list[Image.Image],
    tokens: Tensor,
    lens: Tensor,
    paths: list[str | Path],
) -> list[Path]:
    """One PNG per image. images (B, 3, S, S) uint8 (the model's input); display: the same
    images as PIL RGB at a larger size; tokens (B, T) / lens (B,) the captions to explain."""
    maps = cross_attention_maps(model, images, tokens, lens).cpu().numpy()  # (B, T, g, g)
    out = []
    for b, path in enumerate(paths):
        ids = tokens[b, : int(lens[b])].tolist()
        spans = word_spans(tokenizer, ids)
        words = [(w, maps[b, pos].mean(0)) for w, pos in spans]
        out.append(render(display[b], tokenizer.decode(ids), words, path))
    return out
