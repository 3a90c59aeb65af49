"""What an epoch enumerates (``data.epoch_unit``): every image once with a random caption, or
every caption of every image once; the same batches in memory and streamed, per rank, resumed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastcap.data.captionset import CaptionSet
from fastcap.data.records import DataError, Record, epoch_plan
from fastcap.data.sources import load_split_records
from fastcap.data.stream import StreamSet
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.data.wds import WdsSet
from fastcap.train.config import ConfigError, build


@pytest.fixture(scope="module")
def recs(tiny_shapes):
    """The tiny shapes train split with 1..4 captions per image (the split has a fixed count)."""
    out = []
    for i, r in enumerate(load_split_records(f"shapes:{tiny_shapes}", "train")):
        caps = [f"{c} number {i} take {j}" for j, c in enumerate(r.captions * 4)][: 1 + i % 4]
        out.append(Record(r.id, r.path, caps, r.split, r.meta))
    return out


@pytest.fixture(scope="module")
def tok(recs):
    return CaptionTokenizer.train([c for r in recs for c in r.captions], 160)


def _pairs(batches, cs) -> Counter:
    """(image id, caption text) of every sample, read back from the batch's tokens."""
    seen: Counter = Counter()
    for b in batches:
        for rid, row, n in zip(b.ids, b.tokens, b.lens):
            seen[(rid, cs.tokenizer.decode(row[1 : int(n) - 1].tolist()))] += 1
    return seen


def test_caption_epoch_sees_every_caption_once(recs, tok, test_seed):
    seed = test_seed % 1000  # run seeds are small; the generator seed must fit in 64 bits
    cs = CaptionSet(recs, tok, 32, 40, progress=False, epoch_unit="caption")
    n_caps = sum(len(r.captions) for r in recs)
    gb = 8
    assert cs.steps_per_epoch(gb) == n_caps // gb
    seen = _pairs(cs.batches(seed % 7, 0, gb, seed=seed), cs)
    want = Counter(
        {(r.id, tok.decode(tok.encode_batch([c])[0])): 1 for r in recs for c in r.captions}
    )
    assert sum(seen.values()) == n_caps // gb * gb  # drop-last
    assert all(v == 1 for v in seen.values())  # never a pair twice
    assert set(seen) <= set(want) and len(want) - len(seen) < gb
    # two epochs differ in order
    e0 = [b.ids for b in cs.batches(0, 0, gb, seed=seed)]
    e1 = [b.ids for b in cs.batches(1, 0, gb, seed=seed)]
    assert e0 != e1


def test_image_epoch_sees_every_image_once_with_one_caption(recs, tok, test_seed):
    seed = test_seed % 1000
    cs = CaptionSet(recs, tok, 32, 40, progress=False)  # the default unit
    gb = 8
    assert cs.steps_per_epoch(gb) == len(recs) // gb
    ids = [i for b in cs.batches(0, 0, gb, seed=seed) for i in b.ids]
    assert len(ids) == len(set(ids)) == len(recs) // gb * gb


@pytest.mark.parametrize("unit", ["image", "caption"])
def test_stream_equals_memory_per_rank_and_on_resume(recs, tok, unit, test_seed):
    seed = test_seed % 1000
    mem = CaptionSet(recs, tok, 32, 40, progress=False, epoch_unit=unit)
    st = StreamSet(recs, tok, 32, 40, num_workers=0, epoch_unit=unit)
    gb, epoch = 12, seed % 5
    for rank in (0, 1):
        a = list(mem.batches(epoch, 3, gb, seed=seed, rank=rank, world=2))
        b = list(st.batches(epoch, 3, gb, seed=seed, rank=rank, world=2))
        assert len(a) == len(b) == mem.steps_per_epoch(gb) - 3
        for x, y in zip(a, b):
            assert x.ids == y.ids and torch.equal(x.tokens, y.tokens)
            assert torch.equal(x.images, y.images)
    # the two ranks' slices of one global batch are disjoint and together the global batch
    ncap = torch.tensor([len(r.captions) for r in recs])
    one = list(epoch_plan(ncap, epoch, gb, seed=seed, rank=0, world=1, unit=unit))
    r0 = list(epoch_plan(ncap, epoch, gb, seed=seed, rank=0, world=2, unit=unit))
    r1 = list(epoch_plan(ncap, epoch, gb, seed=seed, rank=1, world=2, unit=unit))
    for (_, i, c), (_, i0, c0), (_, i1, c1) in zip(one, r0, r1):
        assert torch.equal(torch.cat([i0, i1]), i) and torch.equal(torch.cat([c0, c1]), c)


def test_bad_units_are_one_line_errors(tiny_shapes, tiny_overrides, tmp_path, tok):
    with pytest.raises(ConfigError, match="data.epoch_unit 'captions': use image or caption"):
        build("shapes-tiny", overrides=[*tiny_overrides, "data.epoch_unit=captions"])
    with pytest.raises(ValueError, match="epoch unit 'pairs'"):
        CaptionSet([], tok, 32, 40, epoch_unit="pairs")
    # (a caption epoch over tar shards works: tests/test_many_nodes.py)
    with pytest.raises(DataError, match="epoch unit 'pairs'"):
        WdsSet(f"{tmp_path}/shard-{{000..001}}.tar", "train", tok, 32, 40, epoch_unit="pairs")
