"""Every data format behind one call: ``open_split(spec, split, ...)`` for training and
``load_split_records(spec, split)`` for evaluation and tokenizer training. The ``--data`` spec
is parsed here (:func:`parse_spec`, :func:`check_spec`) and only here; this is the one module of
:mod:`fastcap.data` that imports the format readers, which know only their own format.

Formats (``--data kind:path``) and how each assigns splits:

* ``shapes:DIR``, ``karpathy:FILE``: the ``split`` field of each image (``restval`` is train).
* ``coco:FILE[=SPLIT][,FILE[=SPLIT]...]``: the official captions format (``images`` with ``id``
  and ``file_name``; ``annotations`` with ``image_id`` and ``caption``). All images of a file
  belong to one split: the one written after ``=``, else the first of train/val/test found in
  the file name (``captions_val2017.json`` -> val). Give several files, comma-separated, for
  several splits. Images are looked for in ``IMAGE_ROOT/<name>`` (``<name>`` from the file name,
  ``captions_train2017.json`` -> ``train2017``) when that folder exists, else in ``IMAGE_ROOT``;
  the default root is the folder above the annotations folder (COCO's own layout).
* ``folder:DIR``: images (in ``DIR/images`` if it exists, else ``DIR``) and a captions file,
  ``captions.csv`` / ``captions.txt`` (rows ``image,caption``, optional header, split on the first
  comma only) or ``captions.jsonl`` (``{"image": ..., "caption": ...}`` or ``"captions": [...]``).
  Splits are drawn from the image name: the first 8 bytes of its MD5 modulo 100 below 90 is train,
  below 95 val, else test — stable when images are added or removed. Ids are the positions of the
  names in sorted order.
* ``wds:PATTERN``: webdataset shards, one pattern per split via ``{split}`` (see
  :mod:`fastcap.data.wds`).

In memory or streamed: shapes always in memory; karpathy / coco / folder in memory up to
``IN_MEMORY_MAX`` images, streamed through DataLoader workers above (or as ``in_memory`` says);
wds always streamed for training; ``in_memory=True`` on a wds split (evaluation) decodes it
into a CaptionSet.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

from fastcap.data.captionset import CaptionSet
from fastcap.data.karpathy import load_records
from fastcap.data.records import DataError, Record
from fastcap.data.stream import StreamSet
from fastcap.data.wds import (
    WdsSet,
    _is_remote,
    expand_shards,
    iter_records,
    iter_shard_captions,
    shard_sizes,
)

KINDS = ("shapes", "karpathy", "coco", "folder", "wds")
# the caption files a folder dataset may hold, in the order they are looked for
FOLDER_CAPTIONS = ("captions.csv", "captions.txt", "captions.jsonl")
IN_MEMORY_MAX = 50_000
SPLITS = ("train", "val", "test")
COCO_FORMAT = (
    "official COCO captions JSON: {'images': [{'id', 'file_name'}], "
    "'annotations': [{'image_id', 'caption'}]}"
)


def parse_spec(spec: str, image_root: str | None = None) -> tuple[str, Path, Path]:
    """``kind:path`` -> (kind, annotation file, image root). Raises DataError before any work."""
    if ":" not in spec:
        raise DataError(
            f"--data {spec!r}: write kind:path with kind one of {', '.join(KINDS)} "
            "(e.g. shapes:data/shapes)"
        )
    kind, path = spec.split(":", 1)
    if kind not in KINDS:
        raise DataError(f"--data {spec!r}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    p = Path(path)
    if kind == "shapes":
        ann = p / "dataset.json"
        if not ann.is_file():
            raise DataError(
                f"--data {spec!r}: {ann} not found; generate it with "
                f"`fastcap-data shapes --out {p}`"
            )
        return kind, ann, Path(image_root) if image_root else p
    if kind == "coco":
        files = coco_files(spec, image_root)  # checks every file exists; DataError otherwise
        return kind, files[0][0], files[0][2]
    if kind == "folder":
        if not p.is_dir():
            raise DataError(
                f"--data {spec!r}: {p} is not a folder (a folder of images with a "
                f"{' / '.join(FOLDER_CAPTIONS)} file of image,caption rows)"
            )
        ann = next((p / n for n in FOLDER_CAPTIONS if (p / n).is_file()), None)
        if ann is None:
            raise DataError(
                f"--data {spec!r}: no captions file in {p}; expected one of "
                f"{', '.join(FOLDER_CAPTIONS)} (CSV rows image,caption or JSONL "
                '{"image": ..., "caption": ...})'
            )
        if image_root:
            return kind, ann, Path(image_root)
        return kind, ann, p / "images" if (p / "images").is_dir() else p
    if kind == "wds":
        # a pattern with {split} may hold only some splits (eval-only shards); one must exist
        for split in ("train", "val", "test"):
            try:
                shards = expand_shards(path, split, spec=spec)
                return kind, Path(shards[0]), Path(shards[0]).parent
            except DataError:
                if split == "test" or "{split}" not in path:
                    raise

    if not p.is_file():
        raise DataError(
            f"--data {spec!r}: {p} not found (a Karpathy-split JSON such as dataset_coco.json)"
        )
    return kind, p, Path(image_root) if image_root else p.parent


def coco_files(spec: str, image_root: str | None = None) -> list[tuple[Path, str, Path]]:
    """``coco:`` spec -> [(annotation file, split, image folder)]; DataError on a bad one."""
    out = []
    for part in spec.split(":", 1)[1].split(","):
        name, _, split = part.partition("=")
        f = Path(name)
        if not split:
            m = re.search(r"(train|val|test)", f.name)
            if m is None:
                raise DataError(
                    f"--data {spec!r}: cannot tell the split of {f.name} (no train/val/test in "
                    f"the name); write coco:{f}=train"
                )
            split = m.group(1)
        if not f.is_file():
            raise DataError(f"--data {spec!r}: {f} not found (an {COCO_FORMAT})")
        root = Path(image_root) if image_root else f.parent.parent
        sub = root / f.stem.split("_", 1)[-1]  # captions_train2017 -> train2017
        out.append((f, split, sub if sub.is_dir() else root))
    return out


def read_coco(ann: Path, split: str, image_root: Path) -> list[Record]:
    """All images of a COCO captions file, with their captions, as records of ``split``."""
    try:
        data = json.loads(Path(ann).read_text())
        caps: dict[int, list[str]] = {int(im["id"]): [] for im in data["images"]}
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        for a in data["annotations"]:
            caps[int(a["image_id"])].append(str(a["caption"]).strip())
    except json.JSONDecodeError as e:
        raise DataError(f"{ann}: not JSON ({e}); expected an {COCO_FORMAT}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{ann}: missing or bad key {e}; expected an {COCO_FORMAT}") from None
    return [Record(i, Path(image_root) / files[i], caps[i], split) for i in sorted(files)]


def folder_split(name: str) -> str:
    """train / val / test (90 / 5 / 5) from the image name alone."""
    h = int.from_bytes(hashlib.md5(name.encode()).digest()[:8], "big") % 100
    return "train" if h < 90 else "val" if h < 95 else "test"


def read_folder(ann: Path, image_root: Path) -> list[Record]:
    """All records of a folder dataset (every split), in sorted image-name order."""
    caps: dict[str, list[str]] = {}
    try:
        text = Path(ann).read_text(encoding="utf-8")
        if ann.suffix == ".jsonl":
            for line in text.splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                got = row["captions"] if "captions" in row else [row["caption"]]
                caps.setdefault(str(row["image"]), []).extend(str(c) for c in got)
        else:
            for n, line in enumerate(text.splitlines(), 1):
                image, comma, cap = line.partition(",")  # captions may hold commas
                if not line.strip() or (n == 1 and line.strip() == "image,caption"):
                    continue
                if not comma:
                    raise ValueError(f"line {n} has no comma")
                cap = cap.strip()
                if len(cap) >= 2 and cap[0] == cap[-1] == '"':  # a CSV writer quoted it
                    cap = cap[1:-1].replace('""', '"')
                caps.setdefault(image.strip(), []).append(cap)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise DataError(
            f"{ann}: cannot read ({type(e).__name__}: {e}); expected CSV rows image,caption or "
            'JSONL lines {"image": ..., "caption": ...}'
        ) from None
    names = sorted(caps)
    return [
        Record(i, Path(image_root) / name, [c.strip() for c in caps[name]], folder_split(name))
        for i, name in enumerate(names)
    ]


def check_spec(spec: str, image_root: str | None = None) -> None:
    """Everything about ``--data`` that can be checked cheaply, before any work: the kind, the
    paths, and that annotation files parse with the expected keys. Raises DataError."""
    kind, ann, root = parse_spec(spec, image_root)
    if kind == "karpathy":
        load_records(ann, root, "train")
    elif kind == "coco":
        for f, split, r in coco_files(spec, image_root):
            read_coco(f, split, r)
    elif kind == "folder" and not read_folder(ann, root):
        raise DataError(f"{ann}: no captions; expected CSV rows image,caption")


def load_split_records(spec: str, split: str, image_root: str | None = None) -> list[Record]:
    """The records of one split (for evaluation and for training the tokenizer).

    wds records carry ``path = SHARD#KEY`` (not a file); their images are in the shards.
    """
    kind, ann, root = parse_spec(spec, image_root)
    if kind in ("shapes", "karpathy"):
        return load_records(ann, root, split)
    if kind == "coco":
        return [
            r
            for f, s, rt in coco_files(spec, image_root)
            if s == split
            for r in read_coco(f, s, rt)
        ]
    if kind == "folder":
        return [r for r in read_folder(ann, root) if r.split == split]
    try:
        expand_shards(spec.split(":", 1)[1], split, spec=spec)
    except DataError:
        return []  # a split without shards is an empty split, as for the other kinds
    return [r for r, _ in iter_records(spec.split(":", 1)[1], split)]


def has_split(spec: str, split: str, image_root: str | None = None) -> bool:
    """Does ``split`` hold any image? From the annotation file, or for shards from
    ``sizes.json`` (else their tar headers): no image is read."""
    kind, _, _ = parse_spec(spec, image_root)
    if kind != "wds":
        return bool(load_split_records(spec, split, image_root))
    try:
        return sum(shard_sizes(expand_shards(spec.split(":", 1)[1], split, spec=spec))) > 0
    except DataError:
        return False


def training_captions(spec: str, split: str, image_root: str | None = None) -> list[str]:
    """Every caption of ``split`` (what the tokenizer is trained on). Local shards: only their
    caption members are read (tarfile seeks over the images); remote ones stream whole."""
    kind, _, _ = parse_spec(spec, image_root)
    if kind != "wds":
        return [c for r in load_split_records(spec, split, image_root) for c in r.captions]
    try:
        urls = expand_shards(spec.split(":", 1)[1], split, spec=spec)
    except DataError:
        return []
    if any(_is_remote(u) for u in urls):
        return [c for r, _ in iter_records(spec.split(":", 1)[1], split) for c in r.captions]
    return [c for u in urls for _, caps in iter_shard_captions(u) for c in caps]


def _wds_in_memory(pattern: str, split: str, tokenizer, image_size, max_len, **kw) -> CaptionSet:
    """A (small) wds split decoded into a CaptionSet, through a temporary folder of its images."""
    with tempfile.TemporaryDirectory(prefix="fastcap-wds-") as d:
        recs = []
        for n, (rec, img) in enumerate(iter_records(pattern, split)):
            f = Path(d) / f"{n:09d}.img"
            f.write_bytes(img or b"")  # no image member: a zero-byte file, counted as bad
            recs.append(Record(rec.id, f, rec.captions, split, {"source": str(rec.path)}))
        if not recs:
            raise DataError(f"wds:{pattern}: split {split!r} has no samples")
        return CaptionSet(recs, tokenizer, image_size, max_len, **kw)


def open_split(
    spec: str,
    split: str,
    *,
    image_root: str | None = None,
    tokenizer,
    image_size: int,
    max_len: int,
    in_memory: bool | None = None,
    num_workers: int = 0,
    progress: bool = False,
    max_bad_fraction: float = 0.01,
    epoch_unit: str = "image",
):
    """One split as a CaptionSet (in memory), StreamSet (files decoded in workers) or WdsSet
    (tar shards). All three offer ``len``, ``steps_per_epoch(global_batch)``,
    ``batches(epoch, start, global_batch, *, seed, rank, world)`` yielding
    ``Batch(images (b, 3, S, S) uint8, tokens (b, L), lens (b,), ids)``, ``bad`` and
    ``records``. ``epoch_unit``: what an epoch enumerates, every image once (``image``) or every
    caption of every image once (``caption``; over tar shards, each sample once per caption,
    counted from ``captions.json``: :mod:`fastcap.data.wds`). Raises DataError on a bad spec,
    an empty split or too many bad records."""
    kind, _, _ = parse_spec(spec, image_root)
    name = split
    if kind == "wds":
        pattern = spec.split(":", 1)[1]
        if in_memory:
            return _wds_in_memory(
                pattern,
                split,
                tokenizer,
                image_size,
                max_len,
                progress=progress,
                max_bad_fraction=max_bad_fraction,
                name=name,
            )
        return WdsSet(
            pattern,
            split,
            tokenizer,
            image_size,
            max_len,
            num_workers=num_workers,
            max_bad_fraction=max_bad_fraction,
            epoch_unit=epoch_unit,
        )
    recs = load_split_records(spec, split, image_root)
    if not recs:
        raise DataError(f"--data {spec!r}: no images in split {split!r}")
    if kind == "shapes" or in_memory or (in_memory is None and len(recs) <= IN_MEMORY_MAX):
        return CaptionSet(
            recs,
            tokenizer,
            image_size,
            max_len,
            progress=progress,
            max_bad_fraction=max_bad_fraction,
            name=name,
            epoch_unit=epoch_unit,
        )
    return StreamSet(
        recs,
        tokenizer,
        image_size,
        max_len,
        num_workers=num_workers,
        max_bad_fraction=max_bad_fraction,
        name=name,
        epoch_unit=epoch_unit,
    )
