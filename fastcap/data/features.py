"""Features of a frozen trunk, computed once.

When the trunk is frozen for the whole run (``model.freeze_trunk``), its output for an image
never changes, so the trainer runs it once per training image, keeps the maps in fp16 and feeds
them to the model in place of the pixels: every step then runs only the encoder and the decoder
(ruotianluo's ImageCaptioning.pytorch and LAVIS train on features computed once the same way).

``data.feature_cache`` says where they live: ``memory`` (the default: computed at the start of
each run, resume included), ``off`` (the frozen trunk runs every step: the reference the cache
is measured against), or a folder, where each trunk has one ``<key>.safetensors`` file holding
one tensor per image. Its key hashes what the features depend on: the trunk's name, stage and
head, the image size and every tensor of the trunk's state dict (so different weights, or a
trunk trained further, never read another's features), and each image's entry is named by the
SHA-256 of its decoded uint8 pixels (what the trunk reads: the file's content after the resize
and crop). A second run on the same photos reads them instead of running the trunk.

Numerics: fp16 keeps about three significant digits of the maps (EfficientNet-Lite's are ReLU6
outputs in [0, 6], so the error is below 0.003); evaluation and captioning run the trunk in the
model's own precision on the pixels, as a user's photo is captioned.

This module imports nothing from :mod:`fastcap.model`: it is handed the vision encoder (any
module with ``trunk``, ``trunk_features`` and ``cfg``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("fastcap.data")

MODES = ("memory", "off")
"""``data.feature_cache`` values that are not a folder."""


def trunk_key(vision) -> str:
    """What the trunk's features depend on, hashed: its config (name, stride, head, image size,
    normalisation) and the bytes of every tensor of its state dict."""
    cfg = vision.cfg
    h = hashlib.sha256()
    desc = {
        "trunk": cfg.trunk,
        "stride": cfg.trunk_stride,
        "head": cfg.trunk_head,
        "image_size": cfg.image_size,
        "norm": cfg.trunk_norm,
        "mean": vision.pixel_mean.flatten().tolist(),
        "std": vision.pixel_std.flatten().tolist(),
    }
    h.update(json.dumps(desc, sort_keys=True).encode())
    for k, v in sorted(vision.trunk.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def image_key(u8: Tensor) -> str:
    """SHA-256 of an image's decoded uint8 (3, S, S) pixels."""
    return hashlib.sha256(u8.contiguous().numpy().tobytes()).hexdigest()[:32]


@torch.no_grad()
def run_trunk(vision, images: Tensor, *, device, batch_size: int = 32) -> Tensor:
    """uint8 (N, 3, S, S) -> fp16 (N, C, g, g) trunk maps, in eval mode (BatchNorm statistics
    fixed), batch by batch on ``device``."""
    was = vision.training
    vision.eval()
    try:
        out = [
            vision.trunk_features(images[s : s + batch_size].to(device)).half().cpu()
            for s in range(0, len(images), batch_size)
        ]
    finally:
        vision.train(was)
    return torch.cat(out).contiguous()


def _load(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def _save(path: Path, entries: dict[str, Tensor]) -> None:
    """Atomically: a run stopped mid-write leaves the old file (or none), never half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in entries.items()}, str(tmp))
    os.replace(tmp, path)


class FeatureTable:
    """fp16 trunk maps of a split's images, looked up by record id.

    Args:
        features: (N, C, g, g) fp16, row i for ``ids[i]``.
        ids: the record ids of the rows.
    """

    def __init__(self, features: Tensor, ids: list[int]):
        self.features = features
        self.row = {rid: i for i, rid in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.row)

    def lookup(self, ids: list[int]) -> Tensor:
        """(b, C, g, g) fp16 maps of the records ``ids``."""
        return self.features[torch.tensor([self.row[i] for i in ids])]


def trunk_features(
    vision,
    images: Tensor,
    *,
    device,
    folder: str | Path | None = None,
    batch_size: int = 32,
) -> tuple[Tensor, dict]:
    """fp16 (N, C, g, g) maps of uint8 ``images`` (N, 3, S, S): read from ``folder``'s file for
    this trunk where present, the rest computed (and added to the file). Returns the maps and
    ``{"computed", "cached", "seconds", "images_per_s", "file"}``."""
    t0 = time.perf_counter()
    path = Path(folder) / f"{trunk_key(vision)}.safetensors" if folder is not None else None
    stored = _load(path) if path is not None else {}
    keys = [image_key(im) for im in images] if path is not None else []
    todo = [i for i, k in enumerate(keys) if k not in stored] if path else list(range(len(images)))
    fresh = run_trunk(vision, images[todo], device=device, batch_size=batch_size) if todo else None
    if path is None:
        out = fresh
    else:
        new = {keys[i]: fresh[j] for j, i in enumerate(todo)} if todo else {}
        if new:
            _save(path, {**stored, **new})
        stored.update(new)
        out = torch.stack([stored[k] for k in keys])
    dt = time.perf_counter() - t0
    stats = {
        "computed": len(todo),
        "cached": len(images) - len(todo),
        "seconds": dt,
        "images_per_s": len(todo) / dt if todo else float("nan"),
        "file": str(path) if path else None,
    }
    return out, stats


def eval_inputs(model, cs, idx: Tensor, device) -> Tensor:
    """What the model reads for rows ``idx`` of the in-memory split ``cs``: the uint8 images,
    or, when its trunk is frozen (``model.freeze_trunk``), the trunk's fp16 maps, as in
    training. Those are computed for the whole split once and kept on it, under the trunk's
    :func:`trunk_key`, so the periodic evaluations, greedy, beam and retrieval on one split
    run the trunk once."""
    vision = model.vision
    if not vision.cfg.freeze_trunk:
        return cs.images[idx].to(device)
    key = trunk_key(vision)
    memo = getattr(cs, "trunk_features", None)
    if memo is None or memo[0] != key:
        memo = (key, run_trunk(vision, cs.images, device=device))
        cs.trunk_features = memo
    return memo[1][idx].to(device)


def split_features(vision, split, mode: str, *, device, progress: bool = True):
    """The :class:`FeatureTable` of an in-memory split (one with ``images`` and ``records``)
    for ``data.feature_cache`` = ``mode``; None for ``off`` or a streamed split (whose images
    are decoded batch by batch: the frozen trunk then runs at every step, and we say so)."""
    if mode == "off":
        return None
    if not hasattr(split, "images"):
        log.warning(
            "data.feature_cache=%s: the training split is streamed, not in memory; the frozen "
            "trunk runs at every step (data.in_memory=true caches its features)",
            mode,
        )
        return None
    folder = None if mode == "memory" else mode
    feats, st = trunk_features(vision, split.images, device=device, folder=folder)
    if progress:
        where = f", {st['cached']} read from {st['file']}" if st["file"] else ""
        print(
            f"features: {len(split.images)} images, {st['computed']} through the frozen trunk "
            f"in {st['seconds']:.1f}s ({st['images_per_s']:.1f} img/s){where}; "
            f"{tuple(feats.shape[1:])} fp16, {feats.numel() * 2 / 2**20:.0f} MiB"
        )
    return FeatureTable(feats, [r.id for r in split.records])
