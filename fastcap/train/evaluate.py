"""Decode a split and score it: caption metrics (pycocoevalcap), the shapes semantic score, the
share of distinct captions, and image<->text retrieval recall from the contrastive embeddings.
Used by ``fastcap-eval`` and by the trainer, whose periodic and final evaluation hooks are at
the end of this module."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastcap.cider import cider_d
from fastcap.data.captionset import CaptionSet
from fastcap.data.features import eval_inputs
from fastcap.data.shapes import caption_correct
from fastcap.data.sources import has_split, open_split
from fastcap.generate import decode_texts, generate
from fastcap.metrics import caption_metrics, shapes_accuracy, simple_tokenize
from fastcap.train.checkpoint import atomic_write

log = logging.getLogger("fastcap.train")


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
        images = eval_inputs(model, cs, idx, device)  # uint8, or a frozen trunk's maps
        gen = generate(model, images, strategy=strategy, **decode_kwargs)
        texts = decode_texts(tokenizer, gen)[::R]
        for i, t, sc in zip(idx.tolist(), texts, gen.scores[::R].tolist()):
            rid = cs.records[i].id
            texts_out[rid], scores_out[rid] = t, sc
    return texts_out, scores_out


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
    img_e, txt_e, owner = [], [], []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        img_tokens, pooled = model.encode_image(eval_inputs(model, cs, idx, device))
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


# ---------------------------------------------------------------------- the trainer's hooks
def print_samples(res: dict[int, str], cs: CaptionSet, n: int) -> None:
    """Captions beside their first reference (ok/BAD for shapes, whose captions are scored)."""
    for rec in cs.records[:n]:
        ok = ""
        if "objects" in rec.meta:
            ok = "ok " if caption_correct(res[rec.id], rec.meta) else "BAD"
        print(f"  {ok} {rec.id:>6}  {res[rec.id]!r:55}  ref: {rec.captions[0]!r}")


def quick_scores(results: dict[int, str], cs: CaptionSet) -> dict[str, float]:
    """CIDEr-D and BLEU-4 without Java (captions tokenised by :func:`simple_tokenize`): what
    periodic validation selects on. CIDEr-D by :func:`fastcap.cider.cider_d`, which equals
    pycocoevalcap's on the same tokens (tests/test_cider.py); BLEU-4 by pycocoevalcap."""
    from pycocoevalcap.bleu.bleu import Bleu

    refs = {r.id: r.captions for r in cs.records if r.id in results}
    gts = {k: [simple_tokenize(c) for c in refs[k]] for k in results}
    res = {k: [simple_tokenize(results[k])] for k in results}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, each = cider_d(results, refs)
    return {"CIDEr-D": cider, "BLEU-4": float(bleu[3]), "CIDEr-D_se": standard_error(each.values())}


def standard_error(values) -> float:
    """Standard error of the mean of per-image scores: the noise of a val metric that model
    selection allows for (:mod:`fastcap.train.selection`)."""
    x = torch.tensor(list(values), dtype=torch.float64)
    return float(x.std() / x.numel() ** 0.5) if x.numel() > 1 else 0.0


def periodic_eval(model, val: CaptionSet, tokenizer, *, device, step: int, cfg) -> dict:
    """Greedy captions of the first ``cfg.eval_samples`` val images, printed and scored
    (:func:`score` without Java, plus :func:`quick_scores`)."""
    res, _ = decode_split(model, val, tokenizer, device=device, limit=cfg.eval_samples)
    metrics = score(res, val, full=False)
    metrics.update(quick_scores(res, val))
    if "semantic_acc" in metrics:  # right (1) or wrong (0) per image
        recs = {r.id: r.meta for r in val.records}
        metrics["semantic_acc_se"] = standard_error(
            float(caption_correct(res[i], recs[i])) for i in res
        )
    line = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    print(f"\n[step {step}] val ({len(res)} images): {line}")
    print_samples(res, val, cfg.num_samples // 2)
    return metrics


FINAL_DECODINGS = (("greedy", {}), ("beam3", {"strategy": "beam", "num_beams": 3}))


def final_eval(model, tokenizer, *, device, cfg, out: Path, progress: bool, tag: str = "") -> dict:
    """Every split of ``cfg.data.eval_splits``, greedy and beam-3: metrics, retrieval (once per
    split: it does not depend on the decoding) and captions files ``captions_{tag}{key}.json``.
    """
    dc, mc = cfg.data, cfg.model
    metrics: dict = {}
    for split in dc.eval_splits:
        if not has_split(dc.data, split, dc.image_root):
            log.warning("no images in split %r; skipped", split)
            continue
        cs = open_split(
            dc.data,
            split,
            image_root=dc.image_root,
            tokenizer=tokenizer,
            image_size=mc.image_size,
            max_len=mc.max_len,
            in_memory=True,
            progress=progress,
            max_bad_fraction=dc.max_bad_fraction,
        )
        for name, kw in FINAL_DECODINGS:
            t0 = time.time()
            mets, res = evaluate_split(
                model, cs, tokenizer, device=device, retrieval=name == "greedy", **kw
            )
            mets["images"] = len(res)
            mets["decode_seconds"] = round(time.time() - t0, 2)
            key = split if name == "greedy" else f"{split}_{name}"
            metrics[key] = mets
            print(f"\n== {split} ({len(res)} images, {name}{', ' + tag[:-1] if tag else ''}) ==")
            print_samples(res, cs, cfg.num_samples if name == "greedy" else 3)
            print(
                "  "
                + " | ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in mets.items()
                )
            )
            data = json.dumps(coco_results(res)).encode()
            atomic_write(out / f"captions_{tag}{key}.json", data)
    return metrics


def write_metrics(out: Path, best: dict | None, last: dict, selection: dict) -> dict:
    """``metrics.json``: the selected weights' scores per split at the top (the best by
    validation when selection ran, else the last), ``last`` (the last weights' scores, the
    same dict when they are the best) and ``selection`` (metric, steps, values)."""
    metrics = {**(best if best is not None else last), "last": last, "selection": selection}
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    print(f"\nwrote {out / 'metrics.json'}")
    return metrics
