"""Karpathy-split JSON: the ``dataset_coco.json`` layout, which the shapes data uses too.

``{"images": [{"filepath", "filename", "split", "cocoid" | "imgid", "sentences": [{"raw"}]}]}``;
the ``--data`` kinds that read it (``shapes:``, ``karpathy:``) are parsed in
:mod:`fastcap.data.sources`.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastcap.data.records import DataError, Record


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
