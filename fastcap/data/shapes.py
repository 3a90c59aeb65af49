"""The synthetic ``shapes`` captioning dataset: generator, caption grammar and exact scorer.

An image holds one or two filled shapes on a noisy gray background; its captions say which
(size, colour, shape) they are and, for two, where one sits relative to the other. Because the
caption grammar is closed, a generated caption can be scored exactly (:func:`caption_correct`).

Layout on disk (the Karpathy JSON that real COCO data uses, plus ``objects`` and ``relation``)::

    out/dataset.json
    out/train/<imgid>.png  out/val/...  out/test/...  out/compositional/...

Determinism: every image draws from its own generator seeded by ``(seed, split, index within
the split)``, so the files are byte-identical for a seed whatever the number of worker
processes, and the val/test/compositional images do not change when only ``train`` changes.
Image ids and sentence ids run over the splits in the order train, val, test, compositional.

Sampling notes where the spec leaves room:

* The background noise is one Gaussian field shared by the three channels, so it stays gray.
* Shapes are antialiased: drawn at 4x resolution, box-filtered down, alpha-composited.
* Geometry (centres, radii) is quantised to 0.01 px *before* the constraints are checked, so the
  values written to ``dataset.json`` satisfy them exactly as stored.
* The constraints are met by rejection: attributes first (split hold-out, the two objects
  differ), then up to ``_GEOMETRY_TRIES`` layouts; if no layout fits, the attributes are drawn
  again. At small canvases this makes two large objects rarer than 1/4 of two-object scenes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("fastcap.data.shapes")

SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 50),
    "purple": (160, 70, 210),
    "white": (235, 235, 235),
}
SIZES = ("small", "large")
# Radius of the circumscribed circle as a fraction of the canvas side, per size word.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.09, 0.13), "large": (0.19, 0.25)}
# (colour, shape) pairs seen only in the `compositional` split.
HOLDOUT_PAIRS = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "star"), ("green", "square")}
)
SPLITS = ("train", "val", "test", "compositional")
MIN_SIZE = 32

P_ONE_OBJECT = 0.3
BACKGROUND_MAX = 50
NOISE_SIGMA = 6.0
COLOR_JITTER = 15
ROTATION_DEG = 15.0
STAR_INNER = 0.45
MIN_GAP_PX = 2.0
RELATION_RATIO = 2.0  # the dominant offset must be at least twice the other
RELATION_MIN_FRAC = 0.25  # ... and at least this fraction of the canvas side

_SUPERSAMPLE = 4
_GEOMETRY_TRIES = 200
_SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}


class DatasetArgumentError(ValueError):
    """A generator argument is out of range; the message says which and what is allowed."""


# --------------------------------------------------------------------------------------------
# Scene sampling


def _sample_attributes(rng: np.random.Generator, split: str) -> list[tuple[str, str, str]]:
    """Draw (size, color, shape) per object until the split's hold-out rule holds."""
    colors = tuple(COLORS)
    while True:
        n = 1 if rng.random() < P_ONE_OBJECT else 2
        objs = [
            (
                SIZES[rng.integers(len(SIZES))],
                colors[rng.integers(len(colors))],
                SHAPES[rng.integers(len(SHAPES))],
            )
            for _ in range(n)
        ]
        if n == 2 and objs[0] == objs[1]:
            continue
        held = any((c, s) in HOLDOUT_PAIRS for _, c, s in objs)
        if held == (split == "compositional"):
            return objs


def _relation(a: dict[str, Any], b: dict[str, Any], size: int) -> str | None:
    """'horizontal', 'vertical' or None (ambiguous) for centres a -> b (y points down)."""
    dx, dy = abs(b["cx"] - a["cx"]), abs(b["cy"] - a["cy"])
    lim = RELATION_MIN_FRAC * size
    if dx >= RELATION_RATIO * dy and dx >= lim:
        return "horizontal"
    if dy >= RELATION_RATIO * dx and dy >= lim:
        return "vertical"
    return None


def _sample_geometry(
    rng: np.random.Generator, attrs: list[tuple[str, str, str]], size: int
) -> tuple[list[dict[str, Any]], str | None] | None:
    """Place the objects; returns (objects ordered left/top first, relation) or None."""
    for _ in range(_GEOMETRY_TRIES):
        objs = []
        for sz, color, shape in attrs:
            lo, hi = SIZE_RANGES[sz]
            r = round(float(rng.uniform(lo * size, hi * size)), 2)
            cx = round(float(rng.uniform(r, size - r)), 2)
            cy = round(float(rng.uniform(r, size - r)), 2)
            objs.append({"shape": shape, "color": color, "size": sz, "cx": cx, "cy": cy, "r": r})
        if len(objs) == 1:
            return objs, None
        a, b = objs
        if math.hypot(b["cx"] - a["cx"], b["cy"] - a["cy"]) < a["r"] + b["r"] + MIN_GAP_PX:
            continue
        kind = _relation(a, b, size)
        if kind == "horizontal":
            return sorted(objs, key=lambda o: o["cx"]), "left"
        if kind == "vertical":
            return sorted(objs, key=lambda o: o["cy"]), "above"
    return None


def _finish_objects(rng: np.random.Generator, objs: list[dict[str, Any]]) -> None:
    """Colour jitter and rotation, drawn after the layout is fixed."""
    for o in objs:
        base = np.array(COLORS[o["color"]])
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        o["rgb"] = [int(v) for v in np.clip(base + jitter, 0, 255)]
        rotates = o["shape"] in ("triangle", "star")
        o["angle"] = round(float(rng.uniform(-ROTATION_DEG, ROTATION_DEG)), 2) if rotates else 0.0


def sample_scene(
    rng: np.random.Generator, split: str, size: int
) -> tuple[list[dict[str, Any]], str | None]:
    """One scene: objects (each {shape, color, size, cx, cy, r, rgb, angle}) and the relation
    (None, "left" or "above"; objects[0] is left of / above objects[1])."""
    while True:
        attrs = _sample_attributes(rng, split)
        placed = _sample_geometry(rng, attrs, size)
        if placed is not None:
            objs, relation = placed
            _finish_objects(rng, objs)
            return objs, relation


# --------------------------------------------------------------------------------------------
# Rendering


def _polygon(
    o: Mapping[str, Any], scale: float, x0: float = 0.0, y0: float = 0.0
) -> list[tuple[float, float]]:
    """Vertices of a square/triangle/star, in pixels of a grid ``scale`` times finer whose
    origin sits at (x0, y0) of the canvas."""
    cx, cy, r = (o["cx"] - x0) * scale, (o["cy"] - y0) * scale, o["r"] * scale
    rot = math.radians(o["angle"])
    if o["shape"] == "square":  # axis-aligned: corners on the circle at 45 degrees
        angles = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [r] * 4
    elif o["shape"] == "triangle":  # first vertex up (y points down, so -90 degrees)
        angles = [-math.pi / 2 + rot + k * 2 * math.pi / 3 for k in range(3)]
        radii = [r] * 3
    else:  # star: 5 outer points on the circle, inner points at STAR_INNER * r
        angles = [-math.pi / 2 + rot + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else STAR_INNER * r for k in range(10)]
    return [(cx + q * math.cos(a), cy + q * math.sin(a)) for a, q in zip(angles, radii)]


def render(objects: Iterable[Mapping[str, Any]], size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw a scene: returns (size, size, 3) uint8. Consumes rng for the background."""
    gray = float(rng.integers(0, BACKGROUND_MAX + 1))
    noise = rng.normal(0.0, NOISE_SIGMA, size=(size, size, 1))
    img = np.clip(gray + noise, 0, 255).repeat(3, axis=2)  # (S, S, 3) float
    s = _SUPERSAMPLE
    for o in objects:
        # Only the object's bounding box (+1 px) is drawn and blended, not the whole canvas.
        x0, y0 = max(0, math.floor(o["cx"] - o["r"]) - 1), max(0, math.floor(o["cy"] - o["r"]) - 1)
        x1 = min(size, math.ceil(o["cx"] + o["r"]) + 1)
        y1 = min(size, math.ceil(o["cy"] + o["r"]) + 1)
        w, h = x1 - x0, y1 - y0
        mask = Image.new("L", (w * s, h * s), 0)
        draw = ImageDraw.Draw(mask)
        if o["shape"] == "circle":
            cx, cy, r = (o["cx"] - x0) * s, (o["cy"] - y0) * s, o["r"] * s
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(_polygon(o, s, x0, y0), fill=255)
        # Box filter = coverage fraction of each output pixel: the antialiased alpha.
        alpha = np.asarray(mask.resize((w, h), Image.BOX), dtype=np.float64)[..., None]
        alpha /= 255.0
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch * (1.0 - alpha) + np.asarray(o["rgb"], np.float64) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Captions


def _phrase(o: Mapping[str, Any]) -> str:
    return f"{o['size']} {o['color']} {o['shape']}"


def references(objects: list[Mapping[str, Any]], relation: str | None) -> list[str]:
    """The reference captions of a scene (lower case, no final period)."""
    if relation is None:
        a = _phrase(objects[0])
        return [f"a {a}", f"there is a {a}", f"one {a}"]
    a, b = _phrase(objects[0]), _phrase(objects[1])
    fwd, back = ("to the left of", "to the right of") if relation == "left" else ("above", "below")
    return [f"a {a} {fwd} a {b}", f"a {b} {back} a {a}", f"there is a {a} {fwd} a {b}"]


Obj = tuple[str, str, str]  # (size, color, shape)


@dataclass(frozen=True)
class ShapesParse:
    """A caption's meaning. ``objects`` is the sorted multiset of (size, color, shape);
    ``relation`` is None or (kind, first, second) with kind "left" or "above", normalised so
    "B to the right of A" and "A to the left of B" both read ("left", A, B)."""

    objects: tuple[Obj, ...]
    relation: tuple[str, Obj, Obj] | None


_NP = rf"({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_REL = {"to the left of": ("left", False), "to the right of": ("left", True)}
_REL |= {"above": ("above", False), "below": ("above", True)}
_REL_RE = "|".join(re.escape(k) for k in _REL)
_ONE = re.compile(rf"(?:a|one|there is a) {_NP}")
_TWO = re.compile(rf"(?:there is )?a {_NP} ({_REL_RE}) a {_NP}")


def parse_caption(text: str) -> ShapesParse | None:
    """Parse a caption of the shapes grammar; None if it is not one.

    Case, surrounding/repeated whitespace and one final period are forgiven; anything else
    outside the grammar (unknown words, "an", missing article) makes it unparseable."""
    t = " ".join(text.lower().split())
    if t.endswith("."):
        t = t[:-1].rstrip()
    m = _ONE.fullmatch(t)
    if m:
        return ShapesParse(objects=(m.groups(),), relation=None)
    m = _TWO.fullmatch(t)
    if m is None:
        return None
    first, rel, second = m.groups()[:3], m.group(4), m.groups()[4:]
    kind, swap = _REL[rel]
    if swap:
        first, second = second, first
    return ShapesParse(objects=tuple(sorted((first, second))), relation=(kind, first, second))


def record_parse(record: Mapping[str, Any]) -> ShapesParse:
    """The ground-truth meaning of an image record of ``dataset.json``."""
    objs = [(o["size"], o["color"], o["shape"]) for o in record["objects"]]
    rel = record.get("relation")
    relation = None if rel is None else (rel, objs[0], objs[1])
    return ShapesParse(objects=tuple(sorted(objs)), relation=relation)


def caption_correct(text: str, image_record: Mapping[str, Any]) -> bool:
    """True iff ``text`` parses to the image's multiset of (size, color, shape) and, for two
    objects, the same relation (either phrasing). An unparseable caption is wrong."""
    parsed = parse_caption(text)
    return parsed is not None and parsed == record_parse(image_record)


# --------------------------------------------------------------------------------------------
# Generation


def _image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, _SPLIT_CODE[split], index])


def make_image(
    seed: int, split: str, index: int, size: int
) -> tuple[list[dict[str, Any]], str | None, bytes]:
    """Image ``index`` of ``split``: (objects, relation, PNG bytes). Pure function of its args."""
    rng = np.random.default_rng(_image_seed(seed, split, index))
    objects, relation = sample_scene(rng, split, size)
    pixels = render(objects, size, rng)
    buf = BytesIO()
    # zlib level 1: on 500 of these noisy 64 px images 1.1 ms and 4.7 KiB each against 1.8 ms
    # and 4.9 KiB at the default level 6 (measured on the shared 2-core machine).
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=1)
    return objects, relation, buf.getvalue()


def _work(task: tuple[int, str, int, int, int, str]) -> tuple[int, list, str | None]:
    seed, split, index, imgid, size, root = task
    objects, relation, png = make_image(seed, split, index, size)
    with open(os.path.join(root, split, f"{imgid}.png"), "wb") as f:
        f.write(png)
    return imgid, objects, relation


def _check_args(counts: Mapping[str, int], size: int, seed: int) -> None:
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise DatasetArgumentError(f"--{name} must be an integer >= 0, got {n!r}")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise DatasetArgumentError(
            f"--size must be an integer >= {MIN_SIZE} (the smallest canvas the shapes spec "
            f"allows), got {size!r}"
        )
    if not isinstance(seed, int) or seed < 0:
        raise DatasetArgumentError(f"--seed must be an integer >= 0, got {seed!r}")


def _default_workers(n_images: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # A pool costs ~0.3 s to start (spawn); below a few thousand images one process is faster.
    return 0 if n_images < 2000 else max(1, min(cpus or 1, 8))


def generate(
    out: str | os.PathLike,
    *,
    train: int = 20000,
    val: int = 1000,
    test: int = 1000,
    compositional: int = 1000,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the shapes dataset to ``out`` and return ``out`` as a Path.

    Args:
        out: the dataset folder; must not exist or be empty unless ``overwrite``.
        train, val, test, compositional: images per split (>= 0).
        size: canvas side S in pixels (>= 32).
        seed: the dataset seed (>= 0); same seed and arguments give byte-identical files.
        overwrite: replace a non-empty ``out`` (only after the new dataset is complete).
        progress: show a progress bar on stderr.
        workers: processes to render with; None picks by size, 0 renders in this process.

    Everything is written to a temporary sibling folder first and renamed into place at the
    end, so an error or an interrupt never leaves a partial dataset at ``out``.

    Raises:
        DatasetArgumentError (a ValueError): a negative count, ``size`` < 32, a negative seed.
        FileExistsError: ``out`` is a non-empty folder (or a file) and ``overwrite`` is False.
    """
    counts = {"train": train, "val": val, "test": test, "compositional": compositional}
    _check_args(counts, size, seed)
    out = Path(out).absolute()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a non-empty folder"
        raise FileExistsError(
            f"{out} is {what}; pass --overwrite (overwrite=True) to replace it, "
            "or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)

    tasks, images, imgid = [], [], 0
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # mkdtemp makes the folder private (0700); the dataset gets the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for split in SPLITS:
            (tmp / split).mkdir()
            for index in range(counts[split]):
                tasks.append((seed, split, index, imgid, size, str(tmp)))
                imgid += 1
        n_workers = _default_workers(len(tasks)) if workers is None else workers
        results = _run(tasks, n_workers, progress)
        sentid = 0
        for (_, split, _, imgid, _, _), (rid, objects, relation) in zip(tasks, results):
            assert rid == imgid  # imap keeps order
            sentences, sentids = [], []
            for raw in references(objects, relation):
                sentences.append({"raw": raw, "tokens": raw.split(), "imgid": imgid})
                sentences[-1]["sentid"] = sentid
                sentids.append(sentid)
                sentid += 1
            images.append(
                {
                    "imgid": imgid,
                    "cocoid": imgid,
                    "filepath": split,
                    "filename": f"{imgid}.png",
                    "split": split,
                    "sentences": sentences,
                    "sentids": sentids,
                    "objects": objects,
                    "relation": relation,
                }
            )
        config = {"size": size, "seed": seed, **counts}
        config["holdout_pairs"] = sorted(list(p) for p in HOLDOUT_PAIRS)
        doc = {"dataset": "shapes", "config": config, "images": images}
        with open(tmp / "dataset.json", "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d images to %s", len(images), out)
    return out


def _run(tasks: list, n_workers: int, progress: bool) -> list:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="shapes", unit="img", mininterval=0.5)
    results = []
    try:
        if n_workers <= 1:
            for t in tasks:
                results.append(_work(t))
                if bar is not None:
                    bar.update()
        else:
            import multiprocessing as mp

            # spawn, not fork: the caller may hold torch/OpenMP threads that fork would copy.
            with mp.get_context("spawn").Pool(n_workers) as pool:
                for r in pool.imap(_work, tasks, chunksize=64):
                    results.append(r)
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is removed only after."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "d")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)


def read_records(
    dataset_json: str | os.PathLike, split: str | None = None
) -> dict[int, dict[str, Any]]:
    """imgid -> image record of a ``dataset.json`` (optionally one split), for scoring."""
    with open(dataset_json) as f:
        doc = json.load(f)
    return {im["imgid"]: im for im in doc["images"] if split is None or im["split"] == split}
