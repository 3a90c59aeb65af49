"""Shards cut short or corrupt: the missing samples are bad records (counted, the shard named,
subject to max_bad_fraction), the epoch still has the steps sizes.json promised, and resume
stays exact."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fastcap.data.records import DataError
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.data.wds import WdsSet
from tests.test_wds import make_shards

S = 16


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer.train([f"a photo {i} , {c}" for i in range(50) for c in range(3)], 80)


def _cut(tmp_path, sizes: list[int], cut: int, keep: float = 0.5) -> None:
    """Shards of ``sizes`` with their sizes.json (as fastcap-data shard writes it); then shard
    ``cut`` loses the second half of its bytes."""
    make_shards(tmp_path, sizes)
    names = [f"train-{n:04d}.tar" for n in range(len(sizes))]
    (tmp_path / "sizes.json").write_text(json.dumps(dict(zip(names, sizes))))
    f = tmp_path / names[cut]
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_shard_is_bad_records_not_a_crash(tmp_path, tok, workers, test_seed):
    """main: RuntimeError: generator raised StopIteration after 2 of 4 steps (workers 0) / 3 of
    4 (workers 2): the cut stream ran out before the steps sizes.json promised."""
    random.seed(test_seed)
    _cut(tmp_path, [8, 8], cut=1)
    pattern = f"{tmp_path}/train-{{0000..0001}}.tar"
    ws = WdsSet(pattern, "train", tok, S, 16, world=1, num_workers=workers, max_bad_fraction=0.5)
    steps = ws.steps_per_epoch(4)
    assert steps == 4
    e0 = list(ws.batches(0, 0, 4, seed=7))
    assert len(e0) == steps  # every rank takes the steps it planned: DeepSpeed needs that
    missing = [n for n, _ in ws.bad]
    assert 1 <= len(missing) <= 8 and all("train-0001.tar" in n for n in missing)
    assert "samples" in ws.bad[0][1]
    # resume at every step gives the same batches
    for k in range(1, steps):
        again = WdsSet(pattern, "train", tok, S, 16, world=1, num_workers=workers,
                       max_bad_fraction=0.5)  # fmt: skip
        tail = list(again.batches(0, k, 4, seed=7))
        assert [b.ids for b in tail] == [b.ids for b in e0[k:]]
        assert all(torch.equal(a.images, b.images) for a, b in zip(tail, e0[k:]))


def test_a_truncated_shard_over_the_threshold_stops_naming_it(tmp_path, tok):
    _cut(tmp_path, [8, 8], cut=0, keep=0.3)
    ws = WdsSet(f"{tmp_path}/train-{{0000..0001}}.tar", "train", tok, S, 16, world=1)
    with pytest.raises(DataError, match=r"records are bad .*train-0000\.tar"):
        list(ws.batches(0, 0, 4, seed=1))


def test_an_unreadable_shard_set_is_a_data_error(tmp_path, tok):
    _cut(tmp_path, [4], cut=0, keep=0.01)
    ws = WdsSet(f"{tmp_path}/train-0000.tar", "train", tok, S, 16, world=1, max_bad_fraction=1.0)
    with pytest.raises(DataError, match="bad"):
        list(ws.batches(0, 0, 4, seed=1))
