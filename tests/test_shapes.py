"""The shapes dataset: determinism, the spec's constraints, rendering geometry, the caption
parser, and the `fastcap-data` command's bad-input rules (exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastcap.cli.data import main as cli_main
from fastcap.data import shapes
from fastcap.data.shapes import caption_correct, generate, parse_caption, read_records

# The spec, written here independently of the generator's own constants.
SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 50),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
SIZE_RANGES = {"small": (0.09, 0.13), "large": (0.19, 0.25)}
HOLDOUT_PAIRS = {("red", "triangle"), ("blue", "circle"), ("yellow", "star"), ("green", "square")}
EPS = 1e-9  # geometry is stored quantised to 0.01 px; this only absorbs float round-off
COUNTS = {"train": 300, "val": 40, "test": 40, "compositional": 120}


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module", params=[64, 37])  # the default canvas and an awkward prime one
def dataset(request, tmp_path_factory):
    size = request.param
    seed = int(np.random.default_rng().integers(0, 2**31))  # fresh each run, printed on failure
    out = tmp_path_factory.mktemp(f"shapes{size}") / "ds"
    generate(out, **COUNTS, size=size, seed=seed, progress=False, workers=0)
    doc = json.loads((out / "dataset.json").read_text())
    return out, doc, size, seed


# ---- determinism -----------------------------------------------------------------------------


def test_same_seed_byte_identical_across_worker_counts(tmp_path):
    seed = int(np.random.default_rng().integers(0, 2**31))
    kw = {
        "train": 23,
        "val": 5,
        "test": 3,
        "compositional": 7,
        "size": 47,
        "seed": seed,
        "progress": False,
    }
    a = generate(tmp_path / "a", **kw, workers=0)
    b = generate(tmp_path / "b", **kw, workers=2)  # process pool: same bytes
    da, db = _tree_digest(a), _tree_digest(b)
    assert len(da) == 1 + 38 and da == db, f"seed {seed}"
    c = generate(tmp_path / "c", **{**kw, "seed": seed + 1}, workers=0)
    assert _tree_digest(c)["dataset.json"] != da["dataset.json"]


def test_other_splits_do_not_depend_on_train_count(tmp_path):
    kw = {
        "val": 4,
        "test": 0,
        "compositional": 0,
        "size": 32,
        "seed": 5,
        "progress": False,
        "workers": 0,
    }
    a = read_records(generate(tmp_path / "a", train=3, **kw) / "dataset.json", split="val")
    b = read_records(generate(tmp_path / "b", train=11, **kw) / "dataset.json", split="val")
    strip = lambda recs: [r["objects"] for r in recs.values()]
    assert strip(a) == strip(b)


# ---- layout and the spec's constraints ---------------------------------------------------------


def test_karpathy_layout(dataset):
    out, doc, size, seed = dataset
    assert doc["dataset"] == "shapes"
    images = doc["images"]
    assert [im["imgid"] for im in images] == list(range(sum(COUNTS.values())))
    for split, n in COUNTS.items():
        assert sum(im["split"] == split for im in images) == n
    sentids = [s["sentid"] for im in images for s in im["sentences"]]
    assert sentids == list(range(len(sentids)))
    for im in images[:: max(1, len(images) // 25)]:
        assert im["cocoid"] == im["imgid"] and im["filepath"] == im["split"]
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"] and s["tokens"] == s["raw"].split()
            assert s["raw"] == s["raw"].lower() and not s["raw"].endswith(".")
        with Image.open(out / im["filepath"] / im["filename"]) as png:
            assert png.mode == "RGB" and png.size == (size, size)
    assert not [p for p in out.parent.iterdir() if p.name != "ds"], "temporary folder left"


def test_objects_obey_the_spec(dataset):
    _, doc, S, seed = dataset
    n_one = n_train = 0
    for im in doc["images"]:
        objs, rel = im["objects"], im["relation"]
        assert len(objs) in (1, 2)
        for o in objs:
            lo, hi = SIZE_RANGES[o["size"]]
            assert lo * S - EPS <= o["r"] <= hi * S + EPS, (seed, o)
            for c in (o["cx"], o["cy"]):
                assert o["r"] - EPS <= c <= S - o["r"] + EPS, (seed, o)
            assert o["shape"] in SHAPES and o["color"] in COLORS
            base = np.array(COLORS[o["color"]])
            assert np.all(np.abs(np.array(o["rgb"]) - base) <= 15), (seed, o)
            if o["shape"] in ("triangle", "star"):
                assert -15 <= o["angle"] <= 15
            else:
                assert o["angle"] == 0
        held = any((o["color"], o["shape"]) in HOLDOUT_PAIRS for o in objs)
        assert held == (im["split"] == "compositional"), (seed, im["imgid"], objs)
        if len(objs) == 1:
            assert rel is None
        else:
            a, b = objs
            key = lambda o: (o["size"], o["color"], o["shape"])
            assert key(a) != key(b), (seed, objs)
            dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
            assert math.hypot(dx, dy) >= a["r"] + b["r"] + 2 - EPS, (seed, objs)
            if rel == "left":  # objects[0] is left of objects[1], unambiguously
                assert dx > 0 and dx >= 2 * abs(dy) - EPS and dx >= 0.25 * S - EPS, (seed, objs)
            else:
                assert rel == "above"
                assert dy > 0 and dy >= 2 * abs(dx) - EPS and dy >= 0.25 * S - EPS, (seed, objs)
        if im["split"] == "train":
            n_train += 1
            n_one += len(objs) == 1
    # P(one object) = 0.3: with 300 images the standard error is 0.026, so +-0.1 is ~4 sigma.
    assert abs(n_one / n_train - 0.3) < 0.1, (seed, n_one / n_train)


def test_references_follow_the_templates(dataset):
    _, doc, _, _ = dataset
    for im in doc["images"]:
        raws = [s["raw"] for s in im["sentences"]]
        objs = im["objects"]
        a = " ".join(objs[0][k] for k in ("size", "color", "shape"))
        if im["relation"] is None:
            assert raws == [f"a {a}", f"there is a {a}", f"one {a}"]
        else:
            b = " ".join(objs[1][k] for k in ("size", "color", "shape"))
            f, r = {"left": ("to the left of", "to the right of"), "above": ("above", "below")}[
                im["relation"]
            ]
            assert raws == [f"a {a} {f} a {b}", f"a {b} {r} a {a}", f"there is a {a} {f} a {b}"]


def test_pixels_match_the_records(dataset):
    """Each object's centre pixel is exactly its colour; everything outside all bounding circles
    is gray background (R == G == B) with noise of about sigma 6."""
    out, doc, S, seed = dataset
    yy, xx = np.mgrid[0:S, 0:S] + 0.5  # pixel centres
    resid = []
    for im in doc["images"][::7]:
        px = np.asarray(Image.open(out / im["filepath"] / im["filename"]), dtype=np.int64)
        outside = np.ones((S, S), dtype=bool)
        for o in im["objects"]:
            assert px[int(o["cy"]), int(o["cx"])].tolist() == o["rgb"], (seed, im["imgid"])
            outside &= np.hypot(xx - o["cx"], yy - o["cy"]) > o["r"] + 1
        bg = px[outside]
        assert np.array_equal(bg[:, 0], bg[:, 1]) and np.array_equal(bg[:, 0], bg[:, 2])
        level = np.median(bg[:, 0])
        assert level <= 50 + 3 * 6
        if level >= 20:  # far enough from 0 that clipping does not shrink the noise
            resid.append(bg[:, 0] - bg[:, 0].mean())
    assert resid, "no image with a bright enough background to check the noise"
    assert 5.0 < np.concatenate(resid).std() < 7.0


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_geometry(shape):
    """Area and vertical extent of each rendered shape against the spec's geometry."""
    S, r, cx, cy = 200, 60.0, 100.0, 100.0
    obj = {"shape": shape, "cx": cx, "cy": cy, "r": r, "rgb": [255, 255, 255], "angle": 0.0}
    seed = int(np.random.default_rng().integers(0, 2**31))
    bg = shapes.render([], S, np.random.default_rng(seed)).astype(np.float64)
    fg = shapes.render([obj], S, np.random.default_rng(seed)).astype(np.float64)
    alpha = ((fg - bg) / (255.0 - bg))[..., 0]  # coverage per pixel, up to rounding
    inner = 0.45 * r
    area = {
        "circle": math.pi * r * r,
        "square": 2 * r * r,  # half-diagonal r
        "triangle": 3 * math.sqrt(3) / 4 * r * r,  # vertices on the circle
        "star": 10 * 0.5 * r * inner * math.sin(math.pi / 5),  # 10 triangles (r, 0.45 r, 36 deg)
    }[shape]
    assert abs(alpha.sum() - area) / area < 0.01, (shape, alpha.sum(), area)
    rows = np.nonzero(alpha.max(axis=1) > 0.5)[0]
    top, bottom = rows.min(), rows.max() + 1
    want_top, want_bottom = {  # one point up (y down): the top vertex is at cy - r
        "circle": (cy - r, cy + r),
        "square": (cy - r / math.sqrt(2), cy + r / math.sqrt(2)),
        "triangle": (cy - r, cy + r / 2),
        "star": (cy - r, cy + r * math.cos(math.pi / 5)),
    }[shape]
    assert abs(top - want_top) <= 1.5 and abs(bottom - want_bottom) <= 1.5, (top, bottom)


def test_rotation_stays_in_the_bounding_circle():
    S = 64
    rng = np.random.default_rng()
    yy, xx = np.mgrid[0:S, 0:S] + 0.5
    for shape in ("triangle", "star"):
        for angle in (-15.0, 7.3, 15.0):
            o = {"shape": shape, "cx": 32.0, "cy": 32.0, "r": 14.0, "rgb": [255] * 3}
            o["angle"] = angle
            pts = np.array(shapes._polygon(o, 1.0))
            assert np.allclose(np.hypot(pts[:, 0] - 32, pts[:, 1] - 32)[::2], 14.0)
            seed = int(rng.integers(0, 2**31))
            bg = shapes.render([], S, np.random.default_rng(seed))
            fg = shapes.render([o], S, np.random.default_rng(seed))
            changed = np.any(fg != bg, axis=2)
            assert not changed[np.hypot(xx - 32, yy - 32) > 14.0 + 1.0].any()


# ---- the caption parser ---------------------------------------------------------------------


def test_every_reference_parses_correct(dataset):
    _, doc, _, _ = dataset
    for im in doc["images"]:
        for s in im["sentences"]:
            assert caption_correct(s["raw"], im), (s["raw"], im["objects"], im["relation"])
            # forgiven: case, extra spaces, one final period
            assert caption_correct("  " + s["raw"].upper().replace(" ", "  ") + ".", im)


def _other(options, value, rng):
    return rng.choice([o for o in options if o != value])


def test_mutated_captions_are_wrong(dataset):
    _, doc, _, seed = dataset
    rng = np.random.default_rng()
    checked = {"size": 0, "color": 0, "shape": 0, "relation": 0, "swap": 0, "count": 0}
    for im in doc["images"]:
        objs, rel = im["objects"], im["relation"]
        raw = im["sentences"][0]["raw"]  # "a A" or "a A <rel> a B"
        words = raw.split()
        # change one attribute of the first object to another value
        for key, pos, options in (("size", 1, ("small", "large")), ("color", 2, list(COLORS))):
            w = list(words)
            w[pos] = _other(options, w[pos], rng)
            assert not caption_correct(" ".join(w), im), (seed, raw, w)
            checked[key] += 1
        w = list(words)
        w[3] = _other(SHAPES, w[3], rng)
        assert not caption_correct(" ".join(w), im)
        checked["shape"] += 1
        if rel is None:
            continue
        flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
        wrong_rel = [flip.get(x, x) for x in words]
        assert not caption_correct(" ".join(wrong_rel), im), (seed, raw)
        other_axis = raw.replace("to the left of", "above") if rel == "left" else raw
        if rel == "above":
            other_axis = raw.replace("above", "to the left of")
        assert not caption_correct(other_axis, im)
        checked["relation"] += 1
        if objs[0]["color"] != objs[1]["color"]:  # swapped colours change the meaning
            w = list(words)
            i2 = len(w) - 2  # colour of the second object
            w[2], w[i2] = w[i2], w[2]
            assert not caption_correct(" ".join(w), im), (seed, raw, w)
            checked["swap"] += 1
        assert not caption_correct(" ".join(words[:4]), im)  # one object of two
        checked["count"] += 1
    assert all(v > 10 for v in checked.values()), checked


def test_parser_normalises_phrasings():
    a = parse_caption("a small red circle to the left of a large blue star")
    assert a is not None and a.relation == ("left", ("small", "red", "circle"), a.relation[2])
    assert a == parse_caption("a large blue star to the right of a small red circle")
    assert a == parse_caption("There is a small red circle to the left of a large blue star.")
    assert a != parse_caption("a small red circle above a large blue star")
    assert a != parse_caption("a large blue star to the left of a small red circle")
    b = parse_caption("a large white square below a small green triangle")
    assert b == parse_caption("a small green triangle above a large white square")
    assert b.relation == ("above", ("small", "green", "triangle"), ("large", "white", "square"))
    one = parse_caption("one large yellow star")
    assert (
        one == parse_caption("a large yellow star") == parse_caption("there is a large yellow star")
    )
    assert one.objects == (("large", "yellow", "star"),) and one.relation is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "a red circle",  # no size
        "an large red circle",
        "a large red circles",
        "a large red circle and a small blue star",
        "a large red circle to the left of",
        "one large red circle to the left of a small blue star",
        "a large red circle to the left of a small blue star to the left of a small red star",
        "a large red circle. a small blue star",
        "a large orange circle",
    ],
)
def test_unparseable_is_wrong(text):
    assert parse_caption(text) is None
    rec = {"objects": [{"size": "large", "color": "red", "shape": "circle"}], "relation": None}
    assert not caption_correct(text, rec)


# ---- fastcap-data: bad input exits 2 and writes nothing ------------------------------------


def _run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--train", "-1"], "--train must be an integer >= 0"),
        (["--compositional", "-7"], "--compositional must be an integer >= 0"),
        (["--size", "31"], "--size must be an integer >= 32"),
        (["--size", "1"], "--size must be an integer >= 32"),
        (["--seed", "-3"], "--seed must be an integer >= 0"),
        (["--workers", "-2"], "--workers must be >= 0"),
    ],
)
def test_cli_bad_numbers(tmp_path, capsys, extra, needle):
    out = tmp_path / "ds"
    code, err = _run_cli(["shapes", "--out", str(out), "--no-progress", *extra], capsys)
    assert code == 2 and needle in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder


def test_cli_refuses_non_empty_out(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["shapes", "--out", str(out), "--train", "3", "--val", "1", "--test", "1"]
    argv += ["--compositional", "1", "--no-progress"]
    code, err = _run_cli(argv, capsys)
    assert code == 2 and "non-empty" in err and "--overwrite" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert cli_main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "compositional",
        "dataset.json",
        "test",
        "train",
        "val",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_cli_into_empty_folder(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    assert cli_main(["shapes", "--out", str(out), "--train", "2", "--val", "0", "--test", "0",
                     "--compositional", "0", "--no-progress"]) == 0  # fmt: skip
    assert len(read_records(out / "dataset.json")) == 2
    assert "wrote 2 images" in capsys.readouterr().out


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """An error while rendering leaves no partial dataset, and an existing one intact."""
    real = shapes.make_image
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk on fire")
        return real(*args)

    kw = {
        "train": 9,
        "val": 1,
        "test": 1,
        "compositional": 1,
        "size": 32,
        "progress": False,
        "workers": 0,
    }
    monkeypatch.setattr(shapes, "make_image", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(tmp_path / "new", **kw)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(shapes, "make_image", real)
    old = generate(tmp_path / "old", **kw)
    before = _tree_digest(old)
    calls["n"] = 0
    monkeypatch.setattr(shapes, "make_image", flaky)
    with pytest.raises(RuntimeError):
        generate(old, **{**kw, "seed": 1}, overwrite=True)
    assert _tree_digest(old) == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_console_entry_exit_code(tmp_path):
    """The module run as a program (what the `fastcap-data` script calls) exits 2 on bad input."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "fastcap.cli.data", "shapes", "--out", str(tmp_path / "d")]
    p = subprocess.run([*cmd, "--val", "-1"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "--val must be an integer >= 0" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []
