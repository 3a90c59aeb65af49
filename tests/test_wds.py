"""Webdataset shards: the `fastcap-data shard` writer round-trips every sample; the streaming
reader yields every sample once per epoch, deterministically, resumes exactly, skips and counts
bad samples; two processes (RANK / WORLD_SIZE) read disjoint shards that cover the split."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcap.cli.data import main as data_main
from fastcap.data.captionset import CaptionSet
from fastcap.data.records import DataError, encode_caption
from fastcap.data.sources import check_spec, load_split_records, open_split
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.data.wds import WdsSet

S = 16


@pytest.fixture(autouse=True)
def _seeded(test_seed):
    """Every random draw below (names, sizes, pixels, seeds) replays from the printed seed."""
    print(f"FASTCAP_TEST_SEED={test_seed}")
    random.seed(test_seed)


@pytest.fixture(scope="module")
def tok(test_seed):
    words = ["a", "red", "blue", "circle", "square", "left", "of", "the", "photo", ","]
    r = random.Random(test_seed)
    return CaptionTokenizer.train([" ".join(r.sample(words, 6)) for _ in range(200)], 80)


def _jpeg(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    h, w = (int(x) for x in rng.integers(1, 40, 2))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def make_shards(root: Path, sizes: list[int], split: str = "train") -> dict[int, list[str]]:
    """Shards of the given sizes, png/jpg and txt/json members mixed; returns id -> captions."""
    rng = np.random.default_rng(random.randrange(2**32))
    want, nid = {}, 0
    for n, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            caps = [f"a photo {nid} , {c}" for c in range(int(rng.integers(1, 4)))]
            img = _jpeg(rng, "PNG") if nid % 2 else _jpeg(rng)
            meta = json.dumps({"id": nid, "captions": caps}).encode()
            members = {"png" if nid % 2 else "jpg": img, "json": meta}
            samples.append((f"s{nid:07d}", members))
            want[nid] = caps
            nid += 1
        write_tar(root / f"{split}-{n:04d}.tar", samples)
    return want


def ids_of(batches) -> list[int]:
    return [i for b in batches for i in b.ids]


def test_shard_writer_round_trips_every_sample(tiny_shapes, tmp_path):
    ann = tiny_shapes / "dataset.json"
    out = tmp_path / "shards"
    rc = data_main(["shard", "--from", str(ann), "--out", str(out), "--shard-size", "7"])
    assert rc == 0
    recs = load_split_records(f"karpathy:{ann}", "train")
    shards = sorted(out.glob("train-*.tar"))
    assert len(shards) == -(-len(recs) // 7) and not list(out.glob("*.tmp"))
    assert json.loads((out / "sizes.json").read_text()) == {
        p.name: min(7, len(recs) - 7 * k) for k, p in enumerate(shards)
    }
    got = {}
    for p in shards:
        with tarfile.open(p) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                got[meta["id"]] = (meta["captions"], members[name[:-5] + ".png"])
    assert sorted(got) == sorted(r.id for r in recs)
    for r in recs:
        assert got[r.id] == (r.captions, r.path.read_bytes())  # bytes, never re-encoded
    # and the reader sees the same records
    back = load_split_records(f"wds:{out}/{{split}}-{{000000..{len(shards) - 1:06d}}}.tar", "train")
    assert {r.id: r.captions for r in back} == {r.id: r.captions for r in recs}


def test_shard_from_flickr_folder(tmp_path, tok, flickr8k_1k):
    out = tmp_path / "fl"
    assert data_main(["shard", "--from", str(flickr8k_1k), "--out", str(out), "--shard-size", "16",
                      "--split", "val"]) == 0  # fmt: skip
    spec = f"wds:{out}/{{split}}-{{000000..000099}}.tar"  # a range wider than what exists
    recs = load_split_records(f"folder:{flickr8k_1k}", "val")
    cs = open_split(spec, "val", tokenizer=tok, image_size=S, max_len=16, in_memory=True)
    assert isinstance(cs, CaptionSet) and sorted(r.id for r in cs.records) == [r.id for r in recs]
    assert not cs.bad and cs.images.shape == (len(recs), 3, S, S)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_deterministic_resumable(tmp_path, tok, workers):
    want = make_shards(tmp_path, [12, 12, 8, 16])  # 48 samples, every stream a multiple of 4
    spec = f"wds:{tmp_path}/{{split}}-{{0000..0003}}.tar"
    check_spec(spec)
    seed, gb = random.randrange(1000), 4
    ws = open_split(spec, "train", tokenizer=tok, image_size=S, max_len=16, num_workers=workers)
    assert isinstance(ws, WdsSet) and len(ws) == 48 and ws.steps_per_epoch(gb) == 12
    e0 = list(ws.batches(0, 0, gb, seed=seed))
    assert sorted(ids_of(e0)) == sorted(want)  # every sample exactly once
    assert all(b.images.shape == (gb, 3, S, S) and b.images.dtype == torch.uint8 for b in e0)
    again = list(ws.batches(0, 0, gb, seed=seed))
    assert ids_of(again) == ids_of(e0)
    assert all(torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
               for a, b in zip(again, e0))  # fmt: skip
    e1 = list(ws.batches(1, 0, gb, seed=seed))
    assert sorted(ids_of(e1)) == sorted(want) and ids_of(e1) != ids_of(e0)
    k = random.randrange(1, 11)
    tail = list(ws.batches(0, k, gb, seed=seed))  # resumed mid-epoch
    assert len(tail) == 12 - k and ids_of(tail) == ids_of(e0[k:])
    assert all(torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
               for a, b in zip(tail, e0[k:]))  # fmt: skip
    # the tokens are one of the sample's own captions
    for b in e0[:2]:
        for i, t, n in zip(b.ids, b.tokens, b.lens):
            assert t[:n].tolist() in [encode_caption(tok, c, 16) for c in want[i]]


def test_bad_samples_counted_skipped_and_threshold(tmp_path, tok, caplog):
    rng = np.random.default_rng(random.randrange(2**32))
    good = [(f"g{i:03d}", {"jpg": _jpeg(rng), "txt": b"a red circle\n"}) for i in range(6)]
    cut = _jpeg(rng)
    bad = [
        ("b0", {"jpg": cut[: len(cut) // 2], "txt": b"truncated"}),
        ("b1", {"jpg": b"", "txt": b"zero bytes"}),
        ("b2", {"txt": b"no image"}),
        ("b3", {"jpg": _jpeg(rng), "json": json.dumps({"captions": ["  "]}).encode()}),
    ]
    samples = (
        good + bad + [(f"h{i:03d}", {"png": _jpeg(rng, "PNG"), "txt": b"x"}) for i in range(6)]
    )
    write_tar(tmp_path / "train-0.tar", samples)
    ws = WdsSet(f"{tmp_path}/train-0.tar", "train", tok, S, 16, max_bad_fraction=0.5, world=1)
    batches = list(ws.batches(0, 0, 8, seed=random.randrange(99)))
    assert sum(len(b.ids) for b in batches) == 12 and len(batches) == 2  # shorter, not fewer
    assert sorted(n.rsplit("#", 1)[1] for n, _ in ws.bad) == ["b0", "b1", "b2", "b3"]
    assert "b0" in caplog.text
    strict = WdsSet(f"{tmp_path}/train-0.tar", "train", tok, S, 16, max_bad_fraction=0.1, world=1)
    with pytest.raises(DataError, match=r"4 of \d+ records are bad"):
        list(strict.batches(0, 0, 8, seed=0))


_RANK_SCRIPT = """
import json, os, sys
from fastcap.data.records import encode_caption
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.data.sources import open_split
tok = CaptionTokenizer.load(sys.argv[2])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
ws = open_split(sys.argv[1], "train", tokenizer=tok, image_size=16, max_len=16, num_workers=1)
out = {"steps": ws.steps_per_epoch(8)}
for epoch in (0, 1):
    out[epoch] = [b.ids for b in ws.batches(epoch, 0, 8, seed=3, rank=rank, world=world)]
print(json.dumps(out))
"""


def test_two_processes_read_disjoint_shards_covering_the_split(tmp_path, tok):
    want = make_shards(tmp_path, [8] * 6)  # 6 shards: 3 per rank
    tok.save(tmp_path / "tok.json")
    spec = f"wds:{tmp_path}/train-{{0000..0005}}.tar"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, spec, str(tmp_path / "tok.json")],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0]["steps"] == outs[1]["steps"] == 48 // 8
    shard_of = {i: i // 8 for i in want}
    for epoch in ("0", "1"):
        per_rank = [[i for b in o[epoch] for i in b] for o in outs]
        assert all(len(b) == 4 for o in outs for b in o[epoch])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(want)  # every sample exactly once
        shards = [{shard_of[i] for i in ids} for ids in per_rank]
        assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(6))


def test_split_rules_and_shard_cli_bad_input(tmp_path, capsys):
    want = make_shards(tmp_path, [3, 2])
    plain = f"wds:{tmp_path}/train-{{0000..0001}}.tar"  # no {split}: the training split only
    assert sorted(r.id for r in load_split_records(plain, "train")) == sorted(want)
    assert load_split_records(plain, "val") == []
    with pytest.raises(DataError, match="no shard"):
        check_spec(f"wds:{tmp_path}/{{split}}-{{0002..0009}}.tar")
    for argv in (
        ["--from", str(tmp_path / "missing.json")],
        ["--from", str(tmp_path), "--shard-size", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            data_main(["shard", *argv, "--out", str(tmp_path / "o")])
        assert e.value.code == 2
    assert not (tmp_path / "o").exists()
