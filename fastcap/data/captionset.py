"""An in-memory split: decoded images (uint8) and tokenised captions, with deterministic,
resumable batches.

Every epoch is a fixed permutation drawn from (seed, epoch), of the images (one caption each,
drawn from (seed, epoch, batch)) or of every (image, caption) pair, as ``epoch_unit`` says
(:func:`fastcap.data.records.epoch_plan`). So the data position of a run is just (epoch, batch)
and resuming reproduces the same batches exactly. With several ranks, each rank takes a
disjoint, equal slice of every global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from fastcap.data.images import read_image
from fastcap.data.records import Batch, DataError, Record, epoch_pairs, epoch_plan

log = logging.getLogger("fastcap.data")


class CaptionSet:
    """Images of one split decoded once into memory, captions tokenised once."""

    def __init__(
        self,
        records: list[Record],
        tokenizer,
        image_size: int,
        max_len: int,
        *,
        progress: bool = True,
        max_bad_fraction: float = 0.01,
        name: str = "split",
        epoch_unit: str = "image",
    ):
        epoch_pairs(torch.ones(1, dtype=torch.long), epoch_unit)  # a bad unit fails first
        self.tokenizer, self.epoch_unit = tokenizer, epoch_unit
        self.max_len = max_len
        images, kept, bad = [], [], []
        it = tqdm(
            records,
            desc=f"decode {name}",
            unit="img",
            disable=not progress,
            mininterval=1.0,
            leave=False,
        )
        for rec in it:
            caps = [c for c in rec.captions if c.strip()]
            if not caps:
                bad.append((rec.path, "no non-empty caption"))
                continue
            try:
                images.append(read_image(rec.path, image_size))
            except (RuntimeError, OSError, ValueError) as e:
                bad.append((rec.path, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                continue
            rec.captions = caps
            kept.append(rec)
        self.bad = bad
        for path, why in bad[:5]:
            log.warning("skipped bad record %s (%s)", path, why)
        if bad:
            log.warning("%s: skipped %d of %d records", name, len(bad), len(records))
        if records and len(bad) / len(records) > max_bad_fraction:
            raise DataError(
                f"{name}: {len(bad)} of {len(records)} records are bad "
                f"({100 * len(bad) / len(records):.1f}% > {100 * max_bad_fraction:.1f}%), "
                f"first: {bad[0][0]} ({bad[0][1]}); fix the data or raise the threshold"
            )
        if not kept:
            raise DataError(f"{name}: no usable records")
        self.records = kept
        self.images = torch.stack(images)  # (N, 3, S, S) uint8
        # tokenised captions, (N, C, max_len) padded, with per-caption lengths (N, C)
        C = max(len(r.captions) for r in kept)
        self.tokens = torch.full((len(kept), C, max_len), tokenizer.pad_id, dtype=torch.long)
        self.lens = torch.zeros(len(kept), C, dtype=torch.long)
        self.ncap = torch.tensor([len(r.captions) for r in kept])
        for i, rec in enumerate(kept):
            for j, ids in enumerate(tokenizer.encode_batch(rec.captions)):
                seq = [tokenizer.bos_id, *ids[: max_len - 2], tokenizer.eos_id]
                self.tokens[i, j, : len(seq)] = torch.tensor(seq)
                self.lens[i, j] = len(seq)

    def __len__(self) -> int:
        return len(self.records)

    def steps_per_epoch(self, global_batch: int) -> int:
        return epoch_pairs(self.ncap, self.epoch_unit) // global_batch

    def batches(
        self, epoch: int, start: int, global_batch: int, *, seed: int, rank: int = 0, world: int = 1
    ) -> Iterator[Batch]:
        """Batches ``start``.. of ``epoch`` (drop-last), this rank's slice of each."""
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} does not divide across {world} ranks")
        plan = epoch_plan(
            self.ncap,
            epoch,
            global_batch,
            seed=seed,
            rank=rank,
            world=world,
            unit=self.epoch_unit,
        )
        for b, idx, cap in plan:
            if b >= start:
                yield self.gather(idx, cap)

    def gather(self, idx: Tensor, cap: Tensor | None = None) -> Batch:
        """Batch of records ``idx`` with caption choice ``cap`` (default: the first)."""
        cap = torch.zeros_like(idx) if cap is None else cap
        lens = self.lens[idx, cap]
        L = int(lens.max())
        return Batch(
            self.images[idx],
            self.tokens[idx, cap, :L],
            lens,
            [self.records[i].id for i in idx.tolist()],
        )
