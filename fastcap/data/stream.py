"""A streaming training split for data that does not fit in memory: images are decoded in
DataLoader workers, batch by batch, never held all at once.

Determinism (so resume is exact): the batches of :meth:`StreamSet.batches` are the same function
of (seed, epoch, batch index, rank, world) as :class:`fastcap.data.captionset.CaptionSet`'s —
the same permutation of the records, the same caption choice — whatever ``num_workers`` is.

Bad records: a missing file, a zero-byte file or a record without a non-empty caption is found
when the split is opened (one ``stat`` per file) and left out of the permutation. An image that
turns out undecodable (corrupt, truncated) is found in a worker: it is dropped from its batch,
which is then one sample shorter; it is counted, the first few are named in the log, and once
the bad share exceeds ``max_bad_fraction`` the run stops with :class:`DataError`. A worker never
raises on a bad image.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from fastcap.data.images import read_image
from fastcap.data.records import (
    BadTracker,
    Batch,
    DataError,
    Record,
    collate,
    encode_caption,
    epoch_pairs,
    epoch_plan,
    precheck,
    short_reason,
)


class _Decode(Dataset):
    """Map-style: item (record index, caption index) -> (image, token ids, id, bad reason)."""

    def __init__(self, records: list[Record], tokenizer, image_size: int, max_len: int):
        self.records, self.tokenizer = records, tokenizer
        self.image_size, self.max_len = image_size, max_len

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]):
        i, c = item
        rec = self.records[i]
        try:
            img = read_image(rec.path, self.image_size)
        except Exception as e:  # any decoder failure is a bad record, never a dead worker
            return None, None, rec.id, (str(rec.path), short_reason(e))
        return img, encode_caption(self.tokenizer, rec.captions[c], self.max_len), rec.id, None


class _Collate:
    """Items -> ((images, tokens, lens, ids) or None, bad): plain tuples, not a Batch, because
    the DataLoader's pin-memory thread pins the tensors of tuples and passes a dataclass through
    unpinned."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        good = [it for it in items if it[3] is None]
        bad = [it[3] for it in items if it[3] is not None]
        if not good:
            return None, bad
        imgs, seqs, ids, _ = zip(*good)
        b = collate(list(imgs), list(seqs), list(ids), self.pad_id)
        return (b.images, b.tokens, b.lens, b.ids), bad


class StreamSet:
    """A split decoded on the fly in ``num_workers`` DataLoader workers (0: in this process).

    Same interface as CaptionSet for training: ``len``, ``steps_per_epoch``, ``batches``,
    ``bad`` (list of (path, reason)), ``records``.
    """

    def __init__(
        self,
        records: list[Record],
        tokenizer,
        image_size: int,
        max_len: int,
        *,
        num_workers: int = 0,
        max_bad_fraction: float = 0.01,
        name: str = "split",
        epoch_unit: str = "image",
    ):
        epoch_pairs(torch.ones(1, dtype=torch.long), epoch_unit)  # a bad unit fails first
        self.epoch_unit = epoch_unit
        self.tokenizer, self.image_size, self.max_len = tokenizer, image_size, max_len
        self.num_workers = num_workers
        self.tracker = BadTracker(name, len(records), max_bad_fraction)
        self.records = precheck(records, self.tracker)
        self.tracker.check()  # missing / empty files and captions: known for the whole split now
        if not self.records:
            raise DataError(f"{name}: no usable records")
        self.ncap = torch.tensor([len(r.captions) for r in self.records])
        self._seen_ids: set[int] = set()

    @property
    def bad(self) -> list[tuple[str, str]]:
        return self.tracker.bad

    def __len__(self) -> int:
        return len(self.records)

    def steps_per_epoch(self, global_batch: int) -> int:
        return epoch_pairs(self.ncap, self.epoch_unit) // global_batch

    def plan(self, epoch: int, global_batch: int, *, seed: int, rank: int, world: int):
        """Yields (batch index, [(record index, caption index)] of this rank) for every batch."""
        for b, idx, cap in epoch_plan(
            self.ncap,
            epoch,
            global_batch,
            seed=seed,
            rank=rank,
            world=world,
            unit=self.epoch_unit,
        ):
            yield b, list(zip(idx.tolist(), cap.tolist()))

    def batches(
        self, epoch: int, start: int, global_batch: int, *, seed: int, rank: int = 0, world: int = 1
    ) -> Iterator[Batch]:
        """Batches ``start``.. of ``epoch`` (drop-last), this rank's slice of each; a batch
        holding an undecodable image is that many samples shorter."""
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} does not divide across {world} ranks")
        plan = [
            items
            for b, items in self.plan(epoch, global_batch, seed=seed, rank=rank, world=world)
            if b >= start
        ]
        loader = DataLoader(
            _Decode(self.records, self.tokenizer, self.image_size, self.max_len),
            batch_sampler=plan,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.tokenizer.pad_id),
            # The step copies images with non_blocking=True (train/step.py), which overlaps the
            # host's work only from pinned memory; the pin thread copies each batch (113 MB at
            # coco-base's 256 x 3 x 384 x 384) beside the loop. Without workers there is no such
            # thread, and pinning would be one more copy in the loop's path.
            pin_memory=self.num_workers > 0 and torch.cuda.is_available(),
            # Off: persistent workers outlive one iteration of *this* DataLoader object, and a
            # new one is built per batches() call (per epoch, per resume position: the plan is
            # what changes). Keeping one alive across epochs would save the workers' start and
            # stop, about 0.4 s per epoch with 8 workers (bench/RESULTS.md), under 0.3% of a
            # coco-base epoch at the A100 rate of the README: not worth a sampler that changes
            # under live workers.
            persistent_workers=False,
        )
        for parts, bad in loader:
            for path, why in bad:
                self.tracker.add(path, why)
            batch = None if parts is None else Batch(*parts)
            if batch is not None:
                self._seen_ids.update(batch.ids)
            # undecodable images count once each, like the records left out when opening
            self.tracker.seen = len(self._seen_ids) + len(self.tracker.bad)
            self.tracker.check()
            if batch is None:
                raise DataError(
                    f"{self.tracker.name}: every image of a batch is bad (first: {bad[0][0]}, "
                    f"{bad[0][1]}); fix the data"
                )
            yield batch
