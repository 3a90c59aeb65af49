"""Real-data formats behind ``--data kind:path``: folder (CSV / JSONL), official COCO captions,
Karpathy JSON; the shared Flickr photographs; bad records (counted, skipped, threshold); bad
specs (one-line DataError naming the expected format); the streaming set's determinism.

Random names, sizes and seeds come from one seed per run, printed by every test (pytest shows
it with a failure); ``FASTCAP_TEST_SEED=N`` replays a run."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcap.data.captionset import CaptionSet
from fastcap.data.records import DataError
from fastcap.data.sources import (
    check_spec,
    folder_split,
    load_split_records,
    open_split,
    parse_spec,
)
from fastcap.data.stream import StreamSet
from fastcap.data.tokenizer import CaptionTokenizer

S = 16  # decoded image side: small keeps the test fast
SEED = int(os.environ.get("FASTCAP_TEST_SEED") or random.SystemRandom().randrange(2**32))


@pytest.fixture
def rng() -> random.Random:
    """The run's random source, fresh for each test; prints the seed that replays it."""
    print(f"FASTCAP_TEST_SEED={SEED}")
    return random.Random(SEED)


def write_image(path: Path, rng: random.Random) -> None:
    """A random image of awkward size and mode (RGB, gray, RGBA, palette) as JPEG or PNG."""
    w, h = rng.choice([1, 7, 31, 64]), rng.choice([1, 13, 63, 40])
    arr = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    mode = rng.choice(["RGB", "L", "RGBA", "P"]) if path.suffix == ".png" else "RGB"
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert(mode).save(path)


def make_folder(root: Path, n: int, rng: random.Random, *, jsonl: bool = False) -> dict:
    """``root/images`` with n images and a captions file; returns name -> captions."""
    caps: dict[str, list[str]] = {}
    for i in range(n):
        name = f"img_{i:04d}.{'png' if i % 3 == 0 else 'jpg'}"
        write_image(root / "images" / name, rng)
        caps[name] = [f"a photo, number {i}, of {rng.randrange(10**6)}"] * rng.randint(1, 3)
    if jsonl:
        lines = [json.dumps({"image": k, "captions": v}) for k, v in caps.items()]
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    else:
        rows = ["image,caption"] + [f"{k},{c}" for k, v in caps.items() for c in v]
        (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return caps


@pytest.fixture(scope="module")
def tok():
    words = ["a", "photo", "number", "of", "the", "dog", "cat", "runs", "on", ","]
    words += [str(d) for d in range(10)]
    r = random.Random(SEED)
    return CaptionTokenizer.train([" ".join(r.sample(words, 8)) for _ in range(200)], 96)


@pytest.mark.parametrize("jsonl", [False, True])
def test_folder_reads_every_image_and_caption(tmp_path, tok, jsonl, rng):
    caps = make_folder(tmp_path, 31, rng, jsonl=jsonl)  # a prime
    spec = f"folder:{tmp_path}"
    check_spec(spec)
    by_split = {s: load_split_records(spec, s) for s in ("train", "val", "test")}
    seen = [r for recs in by_split.values() for r in recs]
    assert sorted(r.path.name for r in seen) == sorted(caps)
    for r in seen:
        assert r.captions == caps[r.path.name]  # commas inside captions survive
        assert r.split == folder_split(r.path.name)
    assert len({r.id for r in seen}) == len(caps)
    cs = open_split(spec, "train", tokenizer=tok, image_size=S, max_len=12)
    assert isinstance(cs, CaptionSet) and len(cs) == len(by_split["train"])
    assert cs.images.shape == (len(cs), 3, S, S) and cs.images.dtype == torch.uint8


def test_folder_csv_quoted_caption_and_split_is_stable(tmp_path, rng):
    write_image(tmp_path / "x.jpg", rng)
    (tmp_path / "captions.csv").write_text('x.jpg,"He said ""hi"", then left"\nx.jpg,plain\n')
    (rec,) = [
        r for s in ("train", "val", "test") for r in load_split_records(f"folder:{tmp_path}", s)
    ]
    assert rec.captions == ['He said "hi", then left', "plain"]
    assert rec.path == tmp_path / "x.jpg"  # no images/ subfolder: images beside the captions
    # the split depends on the name only, so it is the same in every process and run
    names = [f"{rng.randrange(10**9)}.jpg" for _ in range(2000)]
    shares = {s: sum(folder_split(n) == s for n in names) / len(names) for s in ("train", "val")}
    assert 0.86 < shares["train"] < 0.94 and 0.02 < shares["val"] < 0.08


def test_shared_flickr_folder(tok, rng, flickr8k_1k):
    spec = f"folder:{flickr8k_1k}"
    check_spec(spec)
    recs = {s: load_split_records(spec, s) for s in ("train", "val", "test")}
    allr = [r for v in recs.values() for r in v]
    assert len(allr) == 1000 and sum(len(r.captions) for r in allr) == 5000
    assert len({r.path for r in allr}) == 1000 and all(r.path.is_file() for r in allr)
    assert 850 < len(recs["train"]) < 950 and recs["val"] and recs["test"]
    # a caption with commas is kept whole (split on the first comma only; this file quotes it)
    rows = (flickr8k_1k / "captions.txt").read_text().splitlines()[1:]
    with_comma = next(r for r in rows if r.count(",") > 1)
    name, cap = with_comma.split(",", 1)
    assert cap.strip().strip('"') in next(r for r in allr if r.path.name == name).captions
    # real JPEGs of many sizes decode in workers into the model's size
    st = open_split(spec, "val", tokenizer=tok, image_size=S, max_len=16, in_memory=False)
    b = next(st.batches(0, 0, 8, seed=rng.randrange(100)))
    assert b.images.shape == (8, 3, S, S) and b.images.float().std() > 10 and not st.bad


def write_coco(
    path: Path, images: list[tuple[int, str]], caps: dict[int, list[str]], rng: random.Random
) -> None:
    ann = [
        {"id": 1000 * i + j, "image_id": i, "caption": c}
        for i, cs in caps.items()
        for j, c in enumerate(cs)
    ]
    rng.shuffle(ann)  # annotations are not grouped by image in the real files
    imgs = [{"id": i, "file_name": f, "height": 1, "width": 1} for i, f in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "images": imgs, "annotations": ann}))


def test_coco_official_format(tmp_path, tok, rng):
    want = {}
    for split, n in (("train", 13), ("val", 7)):
        images = [(rng.randrange(10**6) * 2 + (split == "val"), f"{k:012d}.jpg") for k in range(n)]
        caps = {i: [f"caption {j} of {i}" for j in range(rng.randint(1, 5))] for i, _ in images}
        for _, f in images:
            write_image(tmp_path / f"{split}2017" / f, rng)
        write_coco(tmp_path / "annotations" / f"captions_{split}2017.json", images, caps, rng)
        want[split] = (dict(images), caps)
    a = tmp_path / "annotations"
    spec = f"coco:{a}/captions_train2017.json,{a}/captions_val2017.json"
    check_spec(spec)
    for split, (files, caps) in want.items():
        recs = load_split_records(spec, split)
        assert {r.id: sorted(r.captions) for r in recs} == {i: sorted(c) for i, c in caps.items()}
        assert all(r.path == tmp_path / f"{split}2017" / files[r.id] for r in recs)
    cs = open_split(spec, "val", tokenizer=tok, image_size=S, max_len=12)
    assert len(cs) == 7 and not cs.bad
    # an explicit split mapping and an explicit image root
    recs = load_split_records(f"coco:{a}/captions_val2017.json=test", "test", str(tmp_path))
    assert len(recs) == 7 and recs[0].path.parent == tmp_path / "val2017"


def test_karpathy_through_sources(tiny_shapes, tok):
    spec = f"shapes:{tiny_shapes}"
    assert len(load_split_records(spec, "val")) == 16
    cs = open_split(spec, "train", tokenizer=tok, image_size=32, max_len=12, in_memory=False)
    assert isinstance(cs, CaptionSet) and len(cs) == 96  # shapes stays in memory
    kspec = f"karpathy:{tiny_shapes / 'dataset.json'}"
    assert [r.id for r in load_split_records(kspec, "test")] == [
        r.id for r in load_split_records(spec, "test")
    ]


def _bad_spec_cases(tmp: Path) -> list[tuple[str, str]]:
    (tmp / "notjson.json").write_text("{images: oops")
    (tmp / "nokeys_train.json").write_text(json.dumps({"images": []}))
    (tmp / "badrow.json").write_text(json.dumps({"images": [{"file_name": "a.jpg"}]}))
    (tmp / "nocaps").mkdir()
    return [
        ("nonsense", "kind:path"),
        ("png:/x", "unknown kind"),
        (f"shapes:{tmp}/none", "fastcap-data shapes"),
        (f"karpathy:{tmp}/none.json", "Karpathy-split JSON"),
        (f"coco:{tmp}/none_train.json", "COCO captions JSON"),
        (f"coco:{tmp}/notjson.json=train", "not JSON"),
        (f"coco:{tmp}/nokeys_train.json", "'annotations'"),
        (f"coco:{tmp}/badrow.json=val", "'id'"),
        (f"coco:{tmp}/nokeys.json", "=train"),
        (f"folder:{tmp}/none", "is not a folder"),
        (f"folder:{tmp}/nocaps", "captions.csv"),
        (f"wds:{tmp}/shards-{{000..009}}.tar", "matches no shard"),
    ]


def test_bad_specs_raise_one_line(tmp_path):
    for spec, expect in _bad_spec_cases(tmp_path):
        with pytest.raises(DataError) as e:
            check_spec(spec)
        msg = str(e.value)
        assert expect in msg and "\n" not in msg, (spec, msg)
    with pytest.raises(DataError):
        parse_spec(f"folder:{tmp_path}/none")


def make_bad_folder(root: Path, n_good: int, rng: random.Random) -> list[str]:
    """n_good images plus one of each bad record; returns the bad names."""
    make_folder(root, n_good, rng)
    img = root / "images"
    write_image(img / "corrupt.jpg", rng)
    data = (img / "corrupt.jpg").read_bytes()
    (img / "corrupt.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (img / "zero.jpg").write_bytes(b"")
    write_image(img / "nocap.jpg", rng)
    rows = ["corrupt.jpg,a cut off photo", "zero.jpg,an empty file", "missing.jpg,not there"]
    rows += ["nocap.jpg,   "]
    with open(root / "captions.csv", "a") as f:
        f.write("\n".join(rows) + "\n")
    return ["corrupt.jpg", "zero.jpg", "missing.jpg", "nocap.jpg"]


def _all_records(spec):
    return [r for s in ("train", "val", "test") for r in load_split_records(spec, s)]


@pytest.mark.parametrize("streamed", [False, True])
def test_bad_records_counted_and_skipped(tmp_path, tok, streamed, caplog, rng):
    bad = make_bad_folder(tmp_path, 96, rng)
    recs = _all_records(f"folder:{tmp_path}")
    kw = {"max_bad_fraction": 0.05, "name": "all"}
    if streamed:
        cs = StreamSet(recs, tok, S, 12, num_workers=0, **kw)
        # the corrupt JPEG is found only when decoded: its batch is one shorter
        sizes = [len(b.ids) for b in cs.batches(0, 0, 97, seed=rng.randrange(99))]
        assert sizes == [96]
    else:
        cs = CaptionSet(recs, tok, S, 12, progress=False, **kw)
        assert len(cs) == 96
    assert sorted(Path(p).name for p, _ in cs.bad) == sorted(bad)
    assert "corrupt.jpg" in caplog.text and "missing.jpg" in caplog.text
    with pytest.raises(DataError, match=r"4 of 100 records are bad .*%"):
        CaptionSet(recs, tok, S, 12, progress=False, max_bad_fraction=0.01)


def test_streamed_bad_share_stops_the_run(tmp_path, tok, rng):
    make_folder(tmp_path, 40, rng)
    recs = _all_records(f"folder:{tmp_path}")
    for r in recs[:3]:  # readable size, undecodable bytes: found only while streaming
        r.path.write_bytes(b"\xff\xd8 not a jpeg at all")
    st = StreamSet(recs, tok, S, 12, max_bad_fraction=0.05, name="train")
    assert not st.bad
    with pytest.raises(DataError, match=r"train: 3 of \d+ records are bad"):
        for _ in st.batches(0, 0, 8, seed=0):
            pass


def test_stream_matches_in_memory_and_resumes(tiny_shapes, tok, rng):
    recs = load_split_records(f"shapes:{tiny_shapes}", "train")
    seed, epoch, gb = rng.randrange(1000), rng.randrange(5), 24
    mem = CaptionSet(recs, tok, 32, 16, progress=False)
    full = list(StreamSet(recs, tok, 32, 16, num_workers=0).batches(epoch, 0, gb, seed=seed))
    want = list(mem.batches(epoch, 0, gb, seed=seed))
    assert len(full) == len(want) == 96 // gb
    for a, b in zip(full, want):
        assert a.ids == b.ids and torch.equal(a.images, b.images)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lens, b.lens)
    # 2 workers, rank 1 of 2, resumed at batch 2: the same samples as the uninterrupted run
    st = StreamSet(recs, tok, 32, 16, num_workers=2)
    tail = list(st.batches(epoch, 2, gb, seed=seed, rank=1, world=2))
    ref = list(mem.batches(epoch, 2, gb, seed=seed, rank=1, world=2))
    assert [b.ids for b in tail] == [b.ids for b in ref]
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(tail, ref))
