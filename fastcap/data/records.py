"""What every reader of :mod:`fastcap.data` shares: the record an image with its captions is,
the batch a split yields, the error a bad spec or file raises, and the accounting of bad
records. A leaf: it imports nothing else from :mod:`fastcap.data`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("fastcap.data")

# bad records named in the log before we only count them
LOG_FIRST = 5
# the bad-share check waits for this many samples, so that one bad image among the first ten
# does not stop a run whose share over the whole split is tiny
MIN_SEEN = 1000


class DataError(ValueError):
    """A data spec or file that cannot be read; the message names the expected format."""


@dataclass
class Record:
    """One image with its reference captions (the unit every dataset yields)."""

    id: int
    path: Path
    captions: list[str]
    split: str
    meta: dict = field(default_factory=dict)


@dataclass
class Batch:
    images: Tensor  # (B, 3, S, S) uint8
    tokens: Tensor  # (B, L) int64: bos, caption, eos, pad
    lens: Tensor  # (B,) int64
    ids: list[int]


EPOCH_UNITS = ("image", "caption")


def epoch_pairs(ncap: Tensor, unit: str) -> int:
    """Samples per epoch: one per image (``image``) or one per caption (``caption``)."""
    if unit not in EPOCH_UNITS:
        raise ValueError(f"epoch unit {unit!r}: use image or caption")
    return len(ncap) if unit == "image" else int(ncap.sum())


def epoch_plan(
    ncap: Tensor, epoch: int, global_batch: int, *, seed: int, rank: int, world: int, unit: str
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(batch index, record indices, caption indices) of this rank for every batch of
    ``epoch`` (drop-last): a pure function of its arguments, so resume is exact.

    ``image``: a permutation of the records drawn from (seed, epoch), one caption per image
    drawn per batch from (seed, epoch, batch); an epoch sees every image once and a random
    caption of each. ``caption``: a permutation of every (record, caption) pair, so an epoch
    sees every caption of every image once; a batch may then hold one image twice (with two
    captions): about B^2 / (2 N) times per batch for N images, 0.3 at COCO's 113k and B 256.
    """
    local = global_batch // world
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if unit == "caption":
        owner = torch.repeat_interleave(torch.arange(len(ncap)), ncap)  # (M,) record of pair
        first = torch.cumsum(ncap, 0) - ncap  # (N,) index of each record's first pair
        which = torch.arange(len(owner)) - first[owner]  # (M,) caption index within record
        perm = torch.randperm(len(owner), generator=g)
        for b in range(len(owner) // global_batch):
            sel = perm[b * global_batch : (b + 1) * global_batch][rank * local : (rank + 1) * local]
            yield b, owner[sel], which[sel]
        return
    if unit != "image":
        raise ValueError(f"epoch unit {unit!r}: use image or caption")
    perm = torch.randperm(len(ncap), generator=g)
    for b in range(len(ncap) // global_batch):
        idx = perm[b * global_batch : (b + 1) * global_batch][rank * local : (rank + 1) * local]
        gc = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + b)
        u = torch.rand(global_batch, generator=gc)[rank * local : (rank + 1) * local]
        yield b, idx, (u * ncap[idx]).long()


def encode_caption(tokenizer, caption: str, max_len: int) -> list[int]:
    """bos, caption tokens (cut to fit), eos — the layout CaptionSet uses."""
    ids = tokenizer.encode_batch([caption])[0]
    return [tokenizer.bos_id, *ids[: max_len - 2], tokenizer.eos_id]


def collate(images: list[Tensor], seqs: list[list[int]], ids: list[int], pad_id: int) -> Batch:
    """Decoded samples -> Batch(images (b, 3, S, S) uint8, tokens (b, L), lens (b,), ids)."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lens.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return Batch(torch.stack(images), tokens, lens, ids)


def short_reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


class BadTracker:
    """Counts bad records (distinct by name), logs the first few, enforces the threshold."""

    def __init__(self, name: str, total: int, max_bad_fraction: float):
        self.name, self.total, self.max_fraction = name, total, max_bad_fraction
        self.bad: list[tuple[str, str]] = []
        self._names: set[str] = set()
        self.seen = 0

    def add(self, path, reason: str) -> None:
        key = str(path)
        if key in self._names:  # the same bad image comes back every epoch
            return
        self._names.add(key)
        self.bad.append((key, reason))
        if len(self.bad) <= LOG_FIRST:
            log.warning("%s: skipped bad record %s (%s)", self.name, key, reason)
        elif len(self.bad) == LOG_FIRST + 1:
            log.warning("%s: more bad records; only counting from now on", self.name)

    def check(self) -> None:
        """DataError once the bad share of the records seen so far exceeds the threshold."""
        seen = min(max(self.seen, len(self.bad)), self.total)
        if seen < min(MIN_SEEN, self.total) or not self.bad:
            return
        if len(self.bad) / seen > self.max_fraction:
            raise DataError(
                f"{self.name}: {len(self.bad)} of {seen} records are bad "
                f"({100 * len(self.bad) / seen:.1f}% > {100 * self.max_fraction:.1f}%), "
                f"first: {self.bad[0][0]} ({self.bad[0][1]}); fix the data or raise the threshold"
            )


def precheck(records: list[Record], tracker: BadTracker) -> list[Record]:
    """Records whose file exists, is not empty and that have a non-empty caption."""
    kept = []
    for rec in records:
        caps = [c.strip() for c in rec.captions if c.strip()]
        if not caps:
            tracker.add(rec.path, "no non-empty caption")
            continue
        try:
            size = Path(rec.path).stat().st_size
        except OSError as e:
            tracker.add(rec.path, short_reason(e))
            continue
        if size == 0:
            tracker.add(rec.path, "zero-byte file")
            continue
        rec.captions = caps
        kept.append(rec)
    tracker.seen = len(records)
    return kept
