"""Write a split as webdataset tar shards (``fastcap-data shard``).

Each sample is ``KEY.jpg`` (or ``.png`` …: the original file's bytes, never re-encoded) and
``KEY.json`` = ``{"id": int, "captions": [str, ...], "split": str}``; the key is the record id,
zero-padded. Shards are ``OUT/SPLIT-000000.tar`` …; each is written under a temporary name and
renamed when complete, so a crash never leaves a truncated shard under a real name. A
``sizes.json`` (shard file name -> samples) and a ``captions.json`` (shard file name ->
captions, what a caption epoch over the shards counts) are written last, the same way.

Records that cannot be used (missing or empty file, no non-empty caption) are skipped and
counted as in training; the images are not decoded here (training checks them).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

from fastcap.data.records import BadTracker, DataError, Record, precheck

log = logging.getLogger("fastcap.data")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: reproducible shards
    tf.addfile(info, io.BytesIO(data))


def write_shards(
    records: list[Record],
    out: str | Path,
    *,
    shard_size: int,
    split: str = "train",
    max_bad_fraction: float = 0.01,
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Write ``records`` as shards of ``shard_size`` samples; returns (shard paths, bad)."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tracker = BadTracker(f"shard {split}", len(records), max_bad_fraction)
    kept = precheck(records, tracker)
    tracker.check()
    if not kept:
        raise DataError(f"shard {split}: no usable records")
    sizes, ncaps = {}, {}
    paths = []
    for n, s in enumerate(range(0, len(kept), shard_size)):
        path = out / f"{split}-{n:06d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        chunk = kept[s : s + shard_size]
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for rec in chunk:
                key = f"{rec.id:012d}"
                ext = Path(rec.path).suffix.lower().lstrip(".") or "jpg"
                ext = "jpg" if ext == "jpeg" else ext
                _add(tf, f"{key}.{ext}", Path(rec.path).read_bytes())
                meta = {"id": rec.id, "captions": rec.captions, "split": split}
                _add(tf, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
        os.replace(tmp, path)
        sizes[path.name] = len(chunk)
        ncaps[path.name] = sum(len(rec.captions) for rec in chunk)
        paths.append(path)
    for name, counts in (("sizes.json", sizes), ("captions.json", ncaps)):
        old = json.loads((out / name).read_text()) if (out / name).is_file() else {}
        old.update(counts)
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(old, indent=1, sort_keys=True))
        os.replace(tmp, out / name)
    return paths, tracker.bad
