"""The driver: command line, time budgets, one subprocess per stage, summary and table.

The driver itself imports only the standard library and torch (to refuse a full check without
a GPU); each stage is imported in its own process (``--stage``), after the environment flags
that must precede ``import triton`` are set.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import STAGES
from .harness import Report, Skip, bootstrap
from .wheels import DEFAULT_DIR as WHEELS_DIR

PACKAGE_DIR = Path(__file__).resolve().parent  # ``python <this folder>`` runs __main__.py
# Seconds per stage on a GPU, and the whole run's budget: 9 minutes, inside the device tool's
# 10-minute command limit (its start, the wheels' install and the transfers come on top). The
# train stage starts fastcap-train twice (process, DeepSpeed and CUDA start-up, then Triton's
# compilation and autotuning in the auto run).
LIMIT_S = {"env": 60, "ext": 180, "correct": 150, "timing": 240, "train": 180}
TOTAL_S = 540
DRY_LIMIT_S = {"env": 60, "ext": 150, "correct": 150, "timing": 120, "train": 150}
DRY_TOTAL_S = 540
# What each stage is expected to take, printed before the first stage starts so that a reader
# of a cut-off log knows what did not get its turn. GPU: estimates, never measured on a GPU
# (ext: one nvcc build for one architecture; correct/timing: Triton compiles and autotunes each
# kernel once; train: two fastcap-train runs of 50 steps with their start-ups). Dry run: the
# CPU rehearsal of 2026-12-02 (bench/RESULTS.md), on 2 cores, rounded up.
ESTIMATE_S = {"env": 15, "ext": 60, "correct": 90, "timing": 150, "train": 150}
DRY_ESTIMATE_S = {"env": 10, "ext": 30, "correct": 30, "timing": 40, "train": 120}
# Kept back for each later stage when a stage's limit is set, so one slow stage cannot starve
# the rest of the run.
RESERVE_S = {"env": 15, "ext": 30, "correct": 60, "timing": 60, "train": 120}


def _child(a) -> int:
    """Run one stage in this process (called by the driver with --stage)."""
    import torch

    if not torch.cuda.is_available():
        if a.dry_run:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    bootstrap()
    rep = Report(Path(a.out), a.stage, a.dry_run)
    try:
        importlib.import_module(f"{__package__}.stage_{a.stage}").run(rep, a)
    except Skip as e:
        rep.set(status="skipped", reason=str(e))
        return 0
    except Exception as e:  # noqa: BLE001 - recorded; the driver goes on with the next stage
        rep.set(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        return 1
    bad = [i["name"] for i in rep.data["items"] if i["status"] == "failed"]
    rep.set(status="failed" if bad else "ok", failed_items=bad)
    return 0


def _run_stage(a, stage: str, limit: float) -> dict:
    out = Path(a.out)
    cmd = [sys.executable, str(PACKAGE_DIR), "--stage", stage, "--out", str(out)]
    cmd += ["--dry-run"] * a.dry_run + ["--quick"] * a.quick
    cmd += ["--wheels", str(getattr(a, "wheels", WHEELS_DIR))]
    cmd += ["--deadline", f"{time.time() + limit:.1f}"]  # the stage may pace itself by it
    t0 = time.perf_counter()
    # own process group: on a timeout the stage and anything it started (nvcc, ninja) go
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, timed_out = proc.wait(), True
    secs = round(time.perf_counter() - t0, 1)
    path = out / f"{stage}.json"
    res = json.loads(path.read_text()) if path.exists() else {"stage": stage, "items": []}
    if timed_out:
        res["status"] = "timeout"
        res["reason"] = f"killed after its {limit:.0f} s limit; items before it are kept"
    elif res.get("status") in (None, "running"):
        res["status"] = "failed"
        res["error"] = f"the stage process exited with {rc} before finishing"
    res["seconds"] = secs
    path.write_text(json.dumps(res, indent=1, default=str))
    return res


def _headline(res: dict) -> str:
    items = res.get("items", [])
    counts = {s: sum(i["status"] == s for i in items) for s in ("ok", "skipped", "failed")}
    head = "/".join(f"{v} {k}" for k, v in counts.items() if v)
    if res["stage"] == "env":
        head = ", ".join(
            f"{i['gbps']} GB/s" if "gbps" in i else f"{i['tflops']} TFLOP/s"
            for i in items
            if i["status"] == "ok"
        )
    if res["stage"] == "train":
        cmp_ = next((i for i in items if i["name"] == "train/compare"), {})
        head = cmp_.get("summary", head)
    return head or res.get("reason", res.get("error", ""))


def _table(summary: dict) -> str:
    lines = [f"{'stage':8} {'status':8} {'s':>6}  result"]
    for st, res in summary["stages"].items():
        lines.append(f"{st:8} {res['status']:8} {res.get('seconds', 0):6}  {_headline(res)}")
    timing = summary["stages"].get("timing", {}).get("items", [])
    ok = [i for i in timing if i["status"] == "ok"]
    if ok:
        lines.append("")
        lines.append(f"{'timing':44} {'ms':>10} {'TFLOP/s':>8} {'peak MiB':>9}")
        for i in ok:
            lines.append(f"{i['name']:44} {i['ms']:10.3f} {i['tflops']:8.2f} {i['peak_mib']!s:>9}")
    return "\n".join(lines)


def _plan(order: list[str], limits: dict, estimates: dict, total: int, dry: bool) -> str:
    """The stages about to run, each with its expected time and its limit, and the budget."""
    what = "dry run (CPU)" if dry else "GPU"
    lines = [f"gpu_check {what}: {len(order)} stages in a {total} s budget"]
    lines += [f"  {s:8} expected ~{estimates[s]:>4} s, limit {limits[s]:>4} s" for s in order]
    lines.append(f"  {'total':8} expected ~{sum(estimates[s] for s in order):>4} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    doc = sys.modules[__package__].__doc__
    p = argparse.ArgumentParser(prog="gpu_check", description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for <stage>.json and summary.json")
    p.add_argument("--dry-run", action="store_true", help="CPU walk-through at tiny shapes")
    p.add_argument("--quick", action="store_true", help="fewer repeats/steps, no largest shapes")
    p.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)}")
    p.add_argument(
        "--wheels",
        type=Path,
        default=WHEELS_DIR,
        help="wheels the train stage installs when DeepSpeed is missing (make gpu-wheels)",
    )
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # internal: the stage's end
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.stage:
        return _child(a)
    chosen = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: the full check is for a GPU; use --dry-run on a CPU")
    limits, total = (DRY_LIMIT_S, DRY_TOTAL_S) if a.dry_run else (LIMIT_S, TOTAL_S)
    estimates = DRY_ESTIMATE_S if a.dry_run else ESTIMATE_S
    order = [s for s in STAGES if s in chosen]
    print(_plan(order, limits, estimates, total, a.dry_run), flush=True)
    t_end = time.monotonic() + total
    summary = {
        "argv": sys.argv,
        "dry_run": a.dry_run,
        "quick": a.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "stages": {},
    }
    for n, stage in enumerate(order):
        later = sum(RESERVE_S[s] for s in order[n + 1 :])
        left = t_end - time.monotonic()
        limit = min(limits[stage], max(left - later, RESERVE_S[stage]), left)
        if left < 10:
            res = {
                "stage": stage,
                "status": "skipped",
                "items": [],
                "reason": f"the {total} s budget of the whole check is spent",
            }
        else:
            print(f"=== {stage} (limit {limit:.0f} s)", flush=True)
            res = _run_stage(a, stage, limit)
        summary["stages"][stage] = res
        # after every stage: a run cut off later (the machine's own limit) still leaves the
        # JSON and the table of what finished
        (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (Path(a.out) / "table.txt").write_text(_table(summary) + "\n")
        print(f"=== {stage}: {res['status']} in {res.get('seconds', 0)} s", flush=True)
    summary["seconds"] = round(total - (t_end - time.monotonic()), 1)
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (Path(a.out) / "table.txt").write_text(_table(summary) + f"\n\ntotal {summary['seconds']} s\n")
    print("\n" + _table(summary) + f"\n\ntotal {summary['seconds']} s", flush=True)
    failed = [s for s, r in summary["stages"].items() if r["status"] in ("failed", "timeout")]
    return 1 if failed else 0
