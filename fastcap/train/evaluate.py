"""Decode a split and score it: caption metrics (pycocoevalcap), the shapes semantic score, the
share of distinct captions, and image<->text retrieval recall from the contrastive embeddings.
Used by the trainer's periodic and final evaluation and by ``fastcap-eval``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastcap.data.captionset import CaptionSet
from fastcap.data.images import normalize
from fastcap.generate import decode_texts, generate
from fastcap.metrics import caption_metrics, shapes_accuracy


@torch.inference_mode()
def decode_split(
    model,
    cs: CaptionSet,
    tokenizer,
    *,
    device,
    limit: int | None = None,
    batch_size: int = 250,
    strategy: str = "greedy",
    progress: bool = False,
    **decode_kwargs,
) -> tuple[dict[int, str], dict[int, float]]:
    """(id -> caption, id -> score) for the first ``limit`` images of ``cs``.

    ``decode_kwargs`` go to :func:`fastcap.generate.generate` (``num_beams``, ``top_p``,
    ``max_new_tokens``...); with several returned sequences the best (first) one is kept.
    """
    model.eval()
    n = len(cs) if limit is None else min(limit, len(cs))
    R = decode_kwargs.get("num_return_sequences", 1)
    texts_out: dict[int, str] = {}
    scores_out: dict[int, float] = {}
    for s in tqdm(range(0, n, batch_size), desc="caption", disable=not progress, leave=False):
        idx = torch.arange(s, min(s + batch_size, n))
        images = normalize(cs.images[idx].to(device))
        gen = generate(model, images, strategy=strategy, **decode_kwargs)
        texts = decode_texts(tokenizer, gen)[::R]
        for i, t, sc in zip(idx.tolist(), texts, gen.scores[::R].tolist()):
            rid = cs.records[i].id
            texts_out[rid], scores_out[rid] = t, sc
    return texts_out, scores_out


def caption_split(
    model,
    cs: CaptionSet,
    tokenizer,
    *,
    device,
    limit: int | None = None,
    batch_size: int = 250,
    max_new_tokens: int | None = None,
    progress: bool = False,
    strategy: str = "greedy",
    **decode_kwargs,
) -> dict[int, str]:
    """id -> caption (greedy unless ``strategy`` says otherwise) for the first ``limit``
    images of ``cs``."""
    texts, _ = decode_split(
        model,
        cs,
        tokenizer,
        device=device,
        limit=limit,
        batch_size=batch_size,
        strategy=strategy,
        progress=progress,
        max_new_tokens=max_new_tokens,
        **decode_kwargs,
    )
    return texts


def score(results: dict[int, str], cs: CaptionSet, *, full: bool = True) -> dict[str, float]:
    """Semantic accuracy when the records carry shapes objects; caption metrics if ``full``."""
    recs = {r.id: r for r in cs.records}
    metrics: dict[str, float] = {}
    if all("objects" in recs[i].meta for i in results):
        metrics["semantic_acc"] = shapes_accuracy(results, {i: recs[i].meta for i in results})
    metrics["distinct_captions"] = len(set(results.values())) / max(len(results), 1)
    if full:
        metrics.update(caption_metrics(results, {i: recs[i].captions for i in results}))
    return metrics


@torch.inference_mode()
def embeddings(
    model, cs: CaptionSet, *, device, limit: int | None = None, batch_size: int = 250
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised contrastive embeddings of the first ``limit`` images and all their
    reference captions.

    Returns image embeddings (N, E), text embeddings (M, E) and the image index (M,) of each
    text. A text embedding is the unimodal state at eos of [bos, caption, eos] decoded with
    ``kv_lens = lens``, exactly as the training forward computes it.
    """
    model.eval()
    n = len(cs) if limit is None else min(limit, len(cs))
    dtype = next(model.parameters()).dtype
    img_e, txt_e, owner = [], [], []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        img_tokens, pooled = model.encode_image(normalize(cs.images[idx].to(device)).to(dtype))
        img_e.append(F.normalize(pooled.float(), dim=-1))
        kv = model.image_kv(img_tokens)
        for c in range(cs.tokens.shape[1]):
            has = cs.ncap[idx] > c  # images with a c-th caption
            if not bool(has.any()):
                break
            sel = has.nonzero().squeeze(1)
            lens = cs.lens[idx[sel], c].to(device)
            tokens = cs.tokens[idx[sel], c, : int(lens.max())].to(device)
            sel_d = sel.to(device)
            kv_c = [(k.index_select(0, sel_d), v.index_select(0, sel_d)) for k, v in kv]
            _, uni, _ = model.decode(tokens, lens, kv_c)
            txt_e.append(F.normalize(model.decoder.text_embedding(uni, lens).float(), dim=-1))
            owner.append(idx[sel])
    return torch.cat(img_e), torch.cat(txt_e), torch.cat(owner).to(device)


def retrieval_recall(
    img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Recall@k both ways from normalised embeddings img (N, E), txt (M, E), owner (M,).

    image->text: an image counts when any of its captions is among its k nearest texts;
    text->image: a caption counts when its image is among its k nearest images.
    """
    sim = img @ txt.T  # (N, M)
    N, M = sim.shape
    out: dict[str, float] = {}
    mine = owner[None, :] == torch.arange(N, device=sim.device)[:, None]  # (N, M)
    for k in ks:
        top_t = sim.topk(min(k, M), dim=1).indices  # (N, k)
        out[f"i2t_R@{k}"] = float(mine.gather(1, top_t).any(1).float().mean())
        top_i = sim.T.topk(min(k, N), dim=1).indices  # (M, k)
        out[f"t2i_R@{k}"] = float((top_i == owner[:, None]).any(1).float().mean())
    return out


def evaluate_split(
    model,
    cs: CaptionSet,
    tokenizer,
    *,
    device,
    strategy: str = "greedy",
    limit: int | None = None,
    batch_size: int = 250,
    full: bool = True,
    retrieval: bool = True,
    progress: bool = False,
    **decode_kwargs,
) -> tuple[dict[str, float], dict[int, str]]:
    """Decode ``cs`` with ``strategy`` and score it: (metrics, id -> caption).

    metrics: :func:`score` (semantic_acc for shapes, distinct_captions, the caption metrics if
    ``full``), and with ``retrieval`` the recall@1/@5 of :func:`retrieval_recall`.
    """
    res, _ = decode_split(
        model,
        cs,
        tokenizer,
        device=device,
        limit=limit,
        batch_size=batch_size,
        strategy=strategy,
        progress=progress,
        **decode_kwargs,
    )
    metrics = score(res, cs, full=full)
    if retrieval:
        metrics.update(
            retrieval_recall(
                *embeddings(model, cs, device=device, limit=limit, batch_size=batch_size)
            )
        )
    return metrics, res


def coco_results(res: dict[int, str]) -> list[dict]:
    """Captions in the COCO results format."""
    return [{"image_id": k, "caption": v} for k, v in res.items()]
