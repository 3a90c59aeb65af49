"""What every stage uses: the per-stage JSON report, the skip signal, timing and peak memory, and
the import set-up that lets a plain checkout run without ``pip install``."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# pyproject.toml's [tool.setuptools.package-dir]: installed, these folders are fastcap.<name>
PACKAGE_DIRS = {"kernels": REPO / "kernels", "csrc": REPO / "csrc"}


def package_root(dest: Path) -> Path:
    """Make ``dest`` a folder for the ``PYTHONPATH`` of a subprocess that runs the product
    (``python -m fastcap.cli.train``) from this checkout without ``pip install``: ``dest/fastcap``
    is the package laid out as pip installs it, a symlink to each entry of ``fastcap/`` plus
    ``kernels`` and ``csrc`` (:data:`PACKAGE_DIRS`). Returns ``dest``."""
    pkg = dest / "fastcap"
    pkg.mkdir(parents=True)
    for entry in sorted((REPO / "fastcap").iterdir()):
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, src in PACKAGE_DIRS.items():
        (pkg / name).symlink_to(src)
    return dest


def bootstrap() -> None:
    """Make ``fastcap`` and ``fastcap.kernels`` importable from a plain checkout."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import fastcap.kernels  # noqa: F401
    except ImportError:
        # not installed: ``kernels/`` is the package ``fastcap.kernels`` (see pyproject.toml)
        kernels = PACKAGE_DIRS["kernels"]
        spec = importlib.util.spec_from_file_location(
            "fastcap.kernels",
            kernels / "__init__.py",
            submodule_search_locations=[str(kernels)],
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastcap.kernels"] = mod
        spec.loader.exec_module(mod)


class Skip(Exception):
    """An item that cannot run here; the message is the reason."""


class Report:
    """A stage's results, rewritten to ``<out>/<stage>.json`` after every item."""

    def __init__(self, out: Path, stage: str, dry_run: bool):
        self.path = out / f"{stage}.json"
        self.data: dict = {"stage": stage, "status": "running", "dry_run": dry_run, "items": []}
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def set(self, **kw) -> None:
        self.data.update(kw)
        self.flush()

    def item(self, name: str, fn: Callable[[], dict]) -> dict:
        """Run one item; an exception is recorded as that item's failure, not the stage's."""
        t0 = time.perf_counter()
        try:
            res = {"name": name, "status": "ok", **fn()}
        except Skip as e:
            res = {"name": name, "status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - one failing item must not lose the rest
            res = {"name": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            res["traceback"] = traceback.format_exc(limit=6)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        self.data["items"].append(res)
        self.flush()
        mark = {"ok": "ok  ", "skipped": "skip", "failed": "FAIL"}[res["status"]]
        extra = res.get("reason") or res.get("error") or res.get("summary", "")
        print(f"[{self.data['stage']}] {mark} {name} ({res['seconds']} s) {extra}", flush=True)
        return res


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[int], object], warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn(i)`` over ``reps`` calls after ``warmup`` calls; ``i``
    counts calls so ``fn`` can rotate among input sets. CUDA events on a GPU."""
    import torch

    for i in range(warmup):
        fn(i)
    sync()
    times = []
    for i in range(warmup, warmup + reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory one call adds above what is allocated before it (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
