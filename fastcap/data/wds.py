"""Webdataset tar shards: a streaming training split, sharded across ranks and workers.

A sample is the tar members sharing a key: an image ``KEY.jpg`` / ``KEY.jpeg`` / ``KEY.png`` /
``KEY.webp`` and captions in ``KEY.json`` (``{"captions": [...], "id": int}``, or
``{"caption": str}``) or ``KEY.txt`` (one caption per non-empty line). ``fastcap-data shard``
writes such shards and a ``sizes.json`` (samples per shard) beside them, as open_clip does; without
it the shards are counted once when the split is opened (their headers are read, not decoded).

``wds:PATTERN`` is a brace pattern (``shards/train-{000000..000099}.tar``); a literal ``{split}``
in it is replaced by the split name, so one spec serves train, val and test.

Sharding, fixed for the whole run: shard ``i`` (in pattern order) belongs to rank ``i % world``
and, within the rank, to stream ``(i // world) % W`` with ``W = max(1, num_workers)``; each stream
runs in its own worker process. Two ranks therefore read disjoint shards, and together every
sample once per epoch when every rank holds the same number of samples (shards of equal size,
a shard count divisible by ``world * W``); otherwise the longer ranks drop their tails so that
all ranks take the same number of steps (DeepSpeed needs that).

Each epoch a stream reads its shards in an order drawn from (seed, epoch, rank, stream) through
a shuffle buffer seeded the same way and cuts the samples into batches of ``global_batch /
world`` (a last partial batch is dropped). The rank's batches are the streams' batches taken
round-robin, skipping exhausted streams. All of that is computed from the shard sizes, so the
position of a run is just (epoch, batch index): resume skips the consumed samples of each stream
(reading, not decoding, them) and continues bit-identically. Batches depend on ``num_workers``:
resume with the same value.

``data.epoch_unit=caption`` (the COCO presets) makes an epoch every caption of every sample
once: each sample enters the shuffle buffer once per caption, with that caption, and the plan
counts captions per shard from ``captions.json`` beside the shards (``fastcap-data shard``
writes it; without it the caption counts are read from the shards' caption members once, when
the split is opened, on local shards only).

A shard cut short or corrupt (webdataset skips the rest of it, with a warning) holds fewer
samples than ``sizes.json`` says: the stream counts each missing sample as a bad record (named
``SHARD#missing-N``, subject to ``max_bad_fraction``) and makes up its planned batches by reading
its shards again, in a new order, from the start (as ``DistributedSampler`` pads a rank by
repeating samples). So every stream yields the batches the plan counted, every rank takes the
same number of steps, and resume, which replays the same reads, stays exact.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from fastcap.data.images import decode_bytes
from fastcap.data.records import (
    BadTracker,
    Batch,
    DataError,
    Record,
    collate,
    encode_caption,
    short_reason,
)

log = logging.getLogger("fastcap.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
TEXT_EXTS = ("json", "txt")
FORMAT = (
    "webdataset tar shards, a brace pattern such as shards/train-{000000..000099}.tar, "
    "each sample KEY.{jpg,png} + KEY.{txt,json}"
)


def _is_remote(pattern: str) -> bool:
    return "://" in pattern or pattern.startswith("pipe:")


def expand_shards(pattern: str, split: str, *, spec: str | None = None) -> list[str]:
    """The shard URLs of ``pattern`` for ``split``, in order; DataError when none exists."""
    from braceexpand import braceexpand

    if "{split}" not in pattern and split != "train":
        # without {split} the pattern is the training split only; val/test are empty
        raise DataError(
            f"--data {spec or 'wds:' + pattern!r}: no {{split}} in the pattern, so it has no "
            f"{split!r} split; write e.g. shards/{{split}}-{{000000..000099}}.tar"
        )
    urls: list[str] = []
    for u in braceexpand(pattern.replace("{split}", split)):
        urls.extend([u] if _is_remote(u) else sorted(glob.glob(u)))
    if not urls:
        raise DataError(
            f"--data {spec or 'wds:' + pattern!r}: the pattern matches no shard for split "
            f"{split!r}; expected {FORMAT}"
        )
    return urls


def _samples(urls: list[str], handler) -> Iterator[dict]:
    from webdataset.tariterators import tarfile_samples

    return tarfile_samples(({"url": u} for u in urls), handler=handler)


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard: from ``sizes.json`` beside the shards, else by reading tar headers."""
    sizes: dict[str, int] = {}
    for d in {str(Path(u).parent) for u in urls if not _is_remote(u)}:
        f = Path(d) / "sizes.json"
        if f.is_file():
            sizes.update({str(Path(d) / k): v for k, v in json.loads(f.read_text()).items()})
    out = []
    for u in urls:
        if u in sizes:
            out.append(sizes[u])
            continue
        if _is_remote(u):
            raise DataError(f"{u}: remote shards need a sizes.json (samples per shard) beside them")
        try:
            with tarfile.open(u) as tf:  # headers only: the members' data is skipped
                keys = {m.name.split(".", 1)[0] for m in tf if m.isfile()}
        except (OSError, tarfile.TarError) as e:
            raise DataError(
                f"{u}: not a readable tar shard ({short_reason(e)}); expected {FORMAT}"
            ) from None
        out.append(len(keys))
    return out


def shard_captions(urls: list[str]) -> list[int]:
    """Captions per shard: from ``captions.json`` beside the shards, else by reading the
    caption members (json / txt) of local shards; the image members are skipped unread."""
    counts: dict[str, int] = {}
    for d in {str(Path(u).parent) for u in urls if not _is_remote(u)}:
        f = Path(d) / "captions.json"
        if f.is_file():
            counts.update({str(Path(d) / k): v for k, v in json.loads(f.read_text()).items()})
    out = []
    for u in urls:
        if u in counts:
            out.append(counts[u])
            continue
        if _is_remote(u):
            raise DataError(
                f"{u}: a caption epoch over remote shards needs a captions.json (captions per "
                "shard, as fastcap-data shard writes it) beside them, or data.epoch_unit=image"
            )
        out.append(sum(max(1, len(c)) for _, c in iter_shard_captions(u)))
    return out


def iter_shard_captions(url: str) -> Iterator[tuple[str, list[str]]]:
    """(key, captions) of every sample of one local shard, reading only its caption members
    (tarfile seeks over the others)."""
    try:
        with tarfile.open(url) as tf:
            members: dict[str, dict] = {}
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {"__key__": key})
                if ext in TEXT_EXTS:
                    members[key][ext] = tf.extractfile(m).read()
            for key, smp in members.items():
                try:
                    yield key, sample_captions(smp)
                except (ValueError, UnicodeDecodeError):
                    yield key, []
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{url}: not a readable tar shard ({short_reason(e)})") from None


def sample_captions(sample: dict) -> list[str]:
    """The non-empty captions of one webdataset sample (json or txt member)."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        caps = meta.get("captions") or [meta.get("caption", "")]
    elif "txt" in sample:
        caps = sample["txt"].decode("utf-8").splitlines()
    else:
        caps = []
    return [c.strip() for c in caps if isinstance(c, str) and c.strip()]


def sample_id(sample: dict) -> int:
    if "json" in sample:
        meta = json.loads(sample["json"])
        if "id" in meta:
            return int(meta["id"])
    # a stable id from the key (not Python's salted hash) so ids agree across processes
    return int.from_bytes(sample["__key__"].encode()[-8:].rjust(8, b"\0"), "big") & (2**62 - 1)


def iter_records(pattern: str, split: str) -> Iterator[tuple[Record, bytes | None]]:
    """Every sample of a split as (Record with path ``SHARD#KEY``, image bytes or None)."""
    for s in _samples(expand_shards(pattern, split), _warn_and_continue):
        img = next((s[e] for e in IMAGE_EXTS if e in s), None)
        try:
            caps = sample_captions(s)
            rid = sample_id(s)
        except (ValueError, UnicodeDecodeError):
            caps, rid = [], sample_id({"__key__": s["__key__"]})
        path = Path(f"{s['__url__']}#{s['__key__']}")
        yield Record(rid, path, caps, split), img


def _warn_and_continue(exn: Exception) -> bool:
    log.warning("webdataset: %s; skipping the rest of the shard", short_reason(exn))
    return True


def _round_robin(counts: list[int]) -> list[int]:
    """Stream of each batch of a rank: streams in turn, exhausted ones skipped."""
    left, order = list(counts), []
    while any(left):
        for s, n in enumerate(left):
            if n:
                order.append(s)
                left[s] -= 1
    return order


class _Stream(IterableDataset):
    """One stream of one rank for one epoch: yields (images, tokens, lens, ids, bad), exactly
    ``planned`` times (see the module docstring on short shards)."""

    def __init__(self, urls, sizes, planned, skip, local, seed, tokenizer, image_size, max_len,
                 buffer, per_caption=False):  # fmt: skip
        self.urls, self.sizes, self.planned = urls, sizes, planned
        self.per_caption = per_caption
        self.skip, self.local, self.seed = skip, local, seed
        self.tokenizer, self.image_size, self.max_len = tokenizer, image_size, max_len
        self.buffer = buffer

    def _shuffled(self, it, rng: random.Random):
        buf: list = []
        for x in it:
            if len(buf) < self.buffer:
                buf.append(x)
                continue
            k = rng.randrange(len(buf))
            yield buf[k]
            buf[k] = x
        rng.shuffle(buf)
        yield from buf

    def _items(self, s: dict):
        """A sample as items (sample, caption index): one per caption in a caption epoch
        (a sample without any still one, to be counted bad), else (sample, None)."""
        if not self.per_caption:
            return [(s, None)]
        try:
            n = len(sample_captions(s))
        except (ValueError, UnicodeDecodeError):
            n = 0
        return [(s, j) for j in range(max(1, n))]

    def _decode(self, item: tuple, rng: random.Random):
        s, j = item
        name = f"{s.get('__url__')}#{s.get('__key__')}"
        u = rng.random()  # drawn for every sample so a bad one shifts no later choice
        try:
            caps = sample_captions(s)
            if not caps:
                return None, (name, "no non-empty caption")
            img = next((s[e] for e in IMAGE_EXTS if e in s), None)
            if img is None:
                return None, (name, f"no image member ({', '.join(IMAGE_EXTS)})")
            x = decode_bytes(img, self.image_size)
            cap = caps[min(int(u * len(caps)), len(caps) - 1) if j is None else j]
            return (x, encode_caption(self.tokenizer, cap, self.max_len), sample_id(s)), None
        except Exception as e:  # a bad sample never kills the worker
            return None, (name, short_reason(e))

    def _passes(self, rng: random.Random, missing: list):
        """The stream's samples through the shuffle buffer: one pass over its shards, then
        (only if the consumer still wants batches: the shards were short) further passes in
        new orders. The first pass appends each shard's missing samples to ``missing``."""
        urls = list(self.urls)
        rng.shuffle(urls)
        seen: collections.Counter = collections.Counter()

        def first():
            for s in _samples(urls, _warn_and_continue):
                items = self._items(s)
                seen[s.get("__url__")] += len(items)
                yield from items
            for u, n in zip(self.urls, self.sizes):
                if seen[u] < n:
                    log.warning("%s: %d of %d samples read; the rest count as bad", u, seen[u], n)
                    why = f"shard cut short or corrupt: {seen[u]} of {n} samples (sizes.json) read"
                    missing.extend((f"{u}#missing-{i}", why) for i in range(n - seen[u]))

        yield from self._shuffled(first(), rng)
        while sum(seen.values()):  # a pass that reads nothing: give up
            rng.shuffle(urls)
            again = (it for s in _samples(urls, _warn_and_continue) for it in self._items(s))
            yield from self._shuffled(again, rng)

    def __iter__(self):
        rng = random.Random(self.seed)
        missing: list = []
        group: list[dict] = []
        done = 0
        for s in self._passes(rng, missing):
            group.append(s)
            if len(group) < self.local:
                continue
            cap_rng = random.Random(f"{self.seed}/{done}")
            if done < self.skip:  # resume: read, do not decode, the consumed batches
                group, done = [], done + 1
                continue
            good, bad = [], []
            for smp in group:
                item, why = self._decode(smp, cap_rng)
                (good.append(item) if why is None else bad.append(why))
            bad = missing + bad
            missing.clear()
            group, done = [], done + 1
            if good:
                imgs, seqs, ids = zip(*good)
                b = collate(list(imgs), list(seqs), list(ids), self.tokenizer.pad_id)
                yield b.images, b.tokens, b.lens, b.ids, bad
            else:
                yield None, None, None, None, bad
            if done >= self.planned:
                return
        while done < self.planned:  # nothing readable at all: every planned batch is bad
            bad = list(missing) or [(str(self.urls[0]), "no readable sample")]
            missing.clear()
            done += 1
            if done > self.skip:
                yield None, None, None, None, bad


def _identity(x):
    return x


class WdsSet:
    """A webdataset split streamed from tar shards (interface of CaptionSet for training).

    ``records`` is read on first access (captions of every shard; no image is decoded).
    """

    def __init__(
        self,
        pattern: str,
        split: str,
        tokenizer,
        image_size: int,
        max_len: int,
        *,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        max_bad_fraction: float = 0.01,
        world: int | None = None,
        epoch_unit: str = "image",
    ):
        self.pattern, self.split = pattern, split
        self.tokenizer, self.image_size, self.max_len = tokenizer, image_size, max_len
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
        if epoch_unit not in ("image", "caption"):
            raise DataError(f"epoch unit {epoch_unit!r}: use image or caption")
        self.epoch_unit = epoch_unit
        self.urls = expand_shards(pattern, split)
        self.sizes = shard_sizes(self.urls)
        # what the plan counts per shard: samples, or captions in a caption epoch
        self.units = self.sizes if epoch_unit == "image" else shard_captions(self.urls)
        if len(self.urls) < self.world:
            raise DataError(
                f"wds:{pattern}: {len(self.urls)} shard(s) for {self.world} ranks; every rank "
                "needs at least one (write smaller shards with fastcap-data shard --shard-size)"
            )
        self.streams = max(1, num_workers)
        if len(self.urls) < self.world * self.streams:
            log.warning(
                "wds:%s: %d shards for %d ranks x %d workers; some workers stay idle",
                pattern,
                len(self.urls),
                self.world,
                self.streams,
            )
        self.tracker = BadTracker(f"wds {split}", sum(self.units), max_bad_fraction)
        self._records: list[Record] | None = None

    @property
    def bad(self) -> list[tuple[str, str]]:
        return self.tracker.bad

    @property
    def records(self) -> list[Record]:
        if self._records is None:
            self._records = [r for r, _ in iter_records(self.pattern, self.split)]
        return self._records

    def __len__(self) -> int:
        return sum(self.sizes)

    def _stream_shards(self, rank: int, world: int) -> list[list[int]]:
        """Shard indices of each stream of ``rank``."""
        mine = [i for i in range(len(self.urls)) if i % world == rank]
        return [[i for i in mine if (i // world) % self.streams == s] for s in range(self.streams)]

    def _counts(self, local: int, rank: int, world: int) -> list[int]:
        """Full batches of each stream of ``rank`` (the same every epoch)."""
        return [sum(self.units[i] for i in sh) // local for sh in self._stream_shards(rank, world)]

    def steps_per_epoch(self, global_batch: int, world: int | None = None) -> int:
        """Batches every rank takes per epoch: the smallest rank's count."""
        world = world or self.world
        local = global_batch // world
        return min(sum(self._counts(local, r, world)) for r in range(world))

    def batches(
        self, epoch: int, start: int, global_batch: int, *, seed: int, rank: int = 0, world: int = 1
    ) -> Iterator[Batch]:
        """Batches ``start``.. of ``epoch``, this rank's; a batch holding bad samples is that
        many shorter."""
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} does not divide across {world} ranks")
        local = global_batch // world
        steps = self.steps_per_epoch(global_batch, world)
        order = _round_robin(self._counts(local, rank, world))[:steps]
        done = order[:start]
        iters = []
        counts = self._counts(local, rank, world)
        for s, shards in enumerate(self._stream_shards(rank, world)):
            ds = _Stream(
                [self.urls[i] for i in shards],
                [self.units[i] for i in shards],
                counts[s],
                done.count(s),
                local,
                f"{seed}/{epoch}/{rank}/{s}",
                self.tokenizer,
                self.image_size,
                self.max_len,
                self.shuffle_buffer,
                per_caption=self.epoch_unit == "caption",
            )
            if self.num_workers > 0:
                # pin_memory: the step's non_blocking copy overlaps only from pinned memory (see
                # StreamSet.batches); the stream's tuples are pinned in its loader's own thread.
                # Not persistent: the worker's dataset is this epoch's stream (its seed, its
                # skip), so the loader is rebuilt per call and a persistent worker keeps nothing.
                ds = DataLoader(
                    ds,
                    batch_size=None,
                    num_workers=1,
                    collate_fn=_identity,
                    pin_memory=torch.cuda.is_available(),
                    persistent_workers=False,
                )
            iters.append(iter(ds))
        for s in order[start:]:
            images, tokens, lens, ids, bad = next(iters[s])
            for name, why in bad:
                self.tracker.add(name, why)
            self.tracker.seen += local
            self.tracker.check()
            if images is None:
                raise DataError(
                    f"wds {self.split}: every sample of a batch is bad (first: {bad[0][0]}, "
                    f"{bad[0][1]}); fix the data"
                )
            yield Batch(images, tokens, lens, list(ids))
