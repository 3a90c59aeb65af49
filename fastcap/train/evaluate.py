"""Decode a split and score it: caption metrics (pycocoevalcap) and, for shapes, the exact
semantic accuracy. Used by the trainer's periodic and final evaluation."""

from __future__ import annotations

import torch
from tqdm import tqdm

from fastcap.data.captionset import CaptionSet
from fastcap.data.images import normalize
from fastcap.generate import decode_texts, greedy
from fastcap.metrics import caption_metrics, shapes_accuracy


@torch.no_grad()
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
) -> dict[int, str]:
    """id -> greedy caption for the first ``limit`` images of ``cs``."""
    model.eval()
    n = len(cs) if limit is None else min(limit, len(cs))
    max_new = max_new_tokens or model.cfg.max_len - 1
    out: dict[int, str] = {}
    for s in tqdm(range(0, n, batch_size), desc="caption", disable=not progress, leave=False):
        idx = torch.arange(s, min(s + batch_size, n))
        images = normalize(cs.images[idx].to(device))
        texts = decode_texts(tokenizer, greedy(model, images, max_new_tokens=max_new))
        for i, t in zip(idx.tolist(), texts):
            out[cs.records[i].id] = t
    return out


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
