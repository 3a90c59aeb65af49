"""Karpathy-split JSON (``dataset_coco.json`` layout, which the shapes data uses too) and the
``kind:path`` data spec the trainer and the CLIs share.

Kinds (the readers of the other formats live in :mod:`fastcap.data.sources`)::

    shapes:DIR                    DIR/dataset.json written by `fastcap-data shapes`
    karpathy:FILE                 dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json
    coco:FILE[=SPLIT][,FILE...]   official captions_*.json (images + annotations)
    folder:DIR                    images + captions.csv / captions.txt / captions.jsonl
    wds:PATTERN                   webdataset tar shards, e.g. shards/train-{000000..000099}.tar
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("shapes", "karpathy", "coco", "folder", "wds")
# the caption files a folder dataset may hold, in the order they are looked for
FOLDER_CAPTIONS = ("captions.csv", "captions.txt", "captions.jsonl")


class DataError(ValueError):
    """A data spec or file that cannot be read; the message names the expected format."""


@dataclass
class Record:
    """One image with its reference captions (the unit every dataset yields)."""

    id: int
    path: Path
    captions: list[str]
    split: str
    meta: dict = field(default_factory=dict)


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
        from fastcap.data.sources import coco_files

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
        from fastcap.data.wds import expand_shards

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


def load_records(ann: Path, image_root: Path, split: str | None = None) -> list[Record]:
    """Records of one split (all splits if None) of a Karpathy JSON file."""
    try:
        data = json.loads(Path(ann).read_text())
        images = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"{ann}: not a Karpathy-split JSON ({{'images': [{{'filepath', "
            f"'filename', 'split', 'sentences': [{{'raw'}}]}}]}}): {e}"
        ) from None
    out = []
    for im in images:
        s = im.get("split")
        if s == "restval":  # Karpathy's extra training images
            s = "train"
        if split is not None and s != split:
            continue
        caps = [sent["raw"].strip() for sent in im.get("sentences", [])]
        path = Path(image_root) / im.get("filepath", "") / im["filename"]
        rid = int(im.get("cocoid", im.get("imgid")))
        meta = {k: v for k, v in im.items() if k in ("objects", "relation")}
        out.append(Record(rid, path, caps, s, meta))
    return out
