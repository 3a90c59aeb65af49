"""Model selection: the weights with the best periodic validation score, kept in ``RUN/best/``.

``best/`` is an inference bundle (:mod:`fastcap.bundle`: ``model.safetensors``,
``model_config.json``, ``tokenizer.json``, so ``fastcap.load(RUN/best)`` and ``fastcap-caption``
read it) plus ``best.json`` (step, metric, value, the validation scores). It is replaced
whole: written to ``best.tmp/``, then renamed, so a crash leaves the previous best intact.
On resume the kept value is read back, so selection continues where it was.

The rule: the later weights, unless an earlier evaluation beat them by more than the noise.
An evaluation replaces ``best/`` when its value is at least the highest value seen so far minus
its own standard error over the val images (``{metric}_se`` in the scores, from the per-image
scores: 1/0 per image for semantic_acc, each image's CIDEr-D; 0 where the metric has no
per-image form, BLEU-4, so there the highest value wins and a tie goes to the later step).
Later weights have trained longer, and a difference inside the noise means nothing: with 500
val images an accuracy moves in steps of 0.002 and its standard error near 0.99 is about
0.004. NaN never wins.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from fastcap.bundle import write_bundle

BEST = "best"
META = "best.json"


def resolve_metric(name: str, val) -> str:
    """``select_metric`` for the val split ``val`` (records, or None): ``auto`` is semantic_acc
    on shapes (records that carry their objects), else CIDEr-D. ConfigError-worthy ValueError
    for semantic_acc on other data, raised before training starts."""
    shapes = val is not None and all("objects" in r.meta for r in val.records)
    if name == "auto":
        return "semantic_acc" if shapes else "CIDEr-D"
    if name == "semantic_acc" and val is not None and not shapes:
        raise ValueError(
            "select_metric semantic_acc needs the shapes data (its val records carry their "
            "objects); use CIDEr-D, BLEU-4 or auto"
        )
    return name


class BestKeeper:
    """Keeps ``out/best`` for ``metric`` by the rule above (``none``: keeps nothing).

    ``value`` is the kept weights' score, ``top`` the highest score seen (they differ when later
    weights within the noise replaced better-scoring ones)."""

    def __init__(self, out: Path, metric: str, model_config: dict, tokenizer_path: Path):
        self.dir, self.metric = out / BEST, metric
        self.model_config, self.tokenizer_path = model_config, tokenizer_path
        self.step: int | None = None
        self.value = self.top = -math.inf
        old = self.dir.with_name(BEST + ".old")
        if old.is_dir() and not self.dir.exists():  # stopped between the two renames
            os.replace(old, self.dir)
        meta = self.dir / META
        if meta.is_file():  # a resumed run: the best so far stands
            kept = json.loads(meta.read_text())
            if kept.get("metric") == metric:
                self.step, self.value = int(kept["step"]), float(kept["value"])
                self.top = float(kept.get("top", self.value))

    @property
    def active(self) -> bool:
        return self.metric != "none"

    def offer(self, step: int, metrics: dict, state: dict[str, torch.Tensor]) -> bool:
        """Keep ``state`` unless the highest ``metric`` so far beats ``metrics[metric]`` by
        more than ``metrics[metric + "_se"]``; True if kept."""
        if not self.active:
            return False
        if self.metric not in metrics:
            raise KeyError(
                f"select_metric {self.metric!r} is not among the validation scores "
                f"({', '.join(sorted(metrics))}); set select_metric to one of them or none"
            )
        value = float(metrics[self.metric])
        noise = float(metrics.get(f"{self.metric}_se", 0.0))
        if not value >= self.top - noise:  # within the noise the later weights win; NaN never
            return False
        tmp = self.dir.with_name(BEST + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_bundle(state, self.model_config, self.tokenizer_path, tmp)
        top = max(self.top, value)
        meta = {"step": step, "metric": self.metric, "value": value, "top": top, "val": metrics}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        old = self.dir.with_name(BEST + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)
        self.step, self.value, self.top = step, value, top
        return True
