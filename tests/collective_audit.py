"""``fastcap-train`` with every torch.distributed collective audited (run as a script, under
torchrun): each rank writes ``RUN/collectives_rank{R}.json``, the device type of every tensor
handed to a collective and whether fastcap's own code made the call. The CPU test machine
has only gloo, which accepts anything; the audit lets a test hold the training path to what
NCCL would accept on a GPU node."""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from fastcap.cli.train import main

OPS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all_single",
)
RECORDS: list[dict] = []


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _origin() -> str:
    """Who called the collective: the innermost frame outside torch.distributed and this file
    is fastcap's own code, or a library's (DeepSpeed)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "collective_audit" in f or "/torch/distributed/" in f:
            continue
        return "fastcap" if "/fastcap/" in f and "site-packages" not in f else "library"
    return "library"


def _audited(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        devices = sorted({t.device.type for t in _tensors(args, kwargs)})
        RECORDS.append({"op": name, "devices": devices, "origin": _origin()})
        return fn(*args, **kwargs)

    return wrapper


for _name in OPS:
    setattr(dist, _name, _audited(_name, getattr(dist, _name)))


def _dump():
    out = os.environ.get("FASTCAP_AUDIT_OUT")
    if out:
        rank = os.environ.get("RANK", "0")
        Path(out, f"collectives_rank{rank}.json").write_text(json.dumps(RECORDS))


atexit.register(_dump)

if __name__ == "__main__":
    sys.exit(main())
