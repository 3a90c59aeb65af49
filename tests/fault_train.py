"""``fastcap-train`` with faults injected, for the reliability tests (run as a script; the
production config has no testing hooks). ``FASTCAP_FAULTS`` is a JSON object:

- ``"nan": [[step, micro], ...]``: the images of that micro-batch (1-based step, 0-based
  micro-batch) become NaN, so its loss is non-finite.
- ``"short": {"step": n}``: that step's batch is cut to its first n samples (as a streamed
  batch that lost bad images would be).
- ``"kill_in_save": {"step": s, "at": "engine" | "publish"}``: SIGKILL this process while
  checkpoint s is written: after the engine wrote its files into the temporary folder, or
  just before the finished folder is renamed into place.
- ``"enospc_in_save": s``: every file write of checkpoint s fails with ENOSPC, like a full disk.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sys

import torch

from fastcap.cli.train import main
from fastcap.train import checkpoint, step

FAULTS = json.loads(os.environ.get("FASTCAP_FAULTS", "{}"))
NAN = {tuple(x) for x in FAULTS.get("nan", [])}
SHORT = {int(k): v for k, v in FAULTS.get("short", {}).items()}
KILL = FAULTS.get("kill_in_save")
ENOSPC = FAULTS.get("enospc_in_save")


def _step_of(engine) -> int:
    return engine.global_steps + 1  # the step being trained (1-based)


_forward = step.forward_micro


def forward_micro(engine, mb, p, generator, capture, objective=None):
    if (_step_of(engine), mb.index) in NAN:
        mb = dataclasses.replace(mb, images=mb.images * float("nan"))
    return _forward(engine, mb, p, generator, capture, objective)


step.forward_micro = forward_micro

_run = step.StepRunner.run


def run(self, batch, **kw):
    n = SHORT.get(kw["step"])
    if n is not None:
        batch = dataclasses.replace(
            batch,
            images=batch.images[:n],
            tokens=batch.tokens[:n],
            lens=batch.lens[:n],
            ids=batch.ids[:n],
        )
    return _run(self, batch, **kw)


step.StepRunner.run = run

_save = checkpoint.save


def save(engine, root, **kw):
    if KILL and kw["step"] == KILL["step"]:
        if KILL["at"] == "engine":
            inner = engine.save_checkpoint

            def save_then_die(*a, **k):
                inner(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)

            engine.save_checkpoint = save_then_die
        else:
            publish = checkpoint._publish

            def die(*a, **k):
                os.kill(os.getpid(), signal.SIGKILL)
                publish(*a, **k)

            checkpoint._publish = die
    if ENOSPC is not None and kw["step"] == ENOSPC:
        real = torch.save

        def full_disk(obj, f, *a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

        torch.save = full_disk
        try:
            return _save(engine, root, **kw)
        finally:
            torch.save = real
    return _save(engine, root, **kw)


checkpoint.save = save

if __name__ == "__main__":
    sys.exit(main())
