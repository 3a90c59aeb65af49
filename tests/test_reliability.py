"""Nothing silently changes the optimisation and nothing is lost at the edges: a skipped
micro-batch leaves the optimiser schedule where a run without the fault has it, a short batch
is split, the LR is the schedule's definition (after a resume too), a crash or a full disk
inside a save keeps the previous checkpoint, and a hand-edited incompatible config is refused.

Faults are injected by ``tests/fault_train.py``, the real CLI with a few functions wrapped."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from test_resume import _cmd, _env, _losses

WARMUP, LR, FLOOR = 4, 2e-3, 0.05


def lr_definition(step: int, total: int) -> float:
    """The LR optimiser step ``step`` (1-based) must use: linear warmup over WARMUP steps to LR,
    then a half cosine down to FLOOR * LR at the last step."""
    i = step - 1
    if i < WARMUP:
        return LR * (i + 1) / WARMUP
    t = min((i - WARMUP) / (total - WARMUP), 1.0)
    return LR * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))


def _run(tmp_path, name, shapes, overrides, args=(), faults=None, check=True):
    out = tmp_path / name
    common = [
        "--data",
        f"shapes:{shapes}",
        *overrides,
        "log_every=1",
        "eval_every=100000",
        "data.eval_splits=",
        "diag_every=0",
        f"optim.warmup_steps={WARMUP}",
        f"optim.lr={LR}",
        f"optim.min_lr_ratio={FLOOR}",
    ]
    return out, _invoke(["--out", str(out), *common, *args], faults, check)


def _resume(out, faults=None, check=True, extra=()):
    return _invoke(["--resume", str(out), *extra], faults, check)


def _invoke(args, faults, check):
    """fastcap-train (with ``faults`` injected, if any) in a subprocess."""
    r = subprocess.run(
        _cmd(args, faults=faults is not None),
        env=_env(faults),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


SCHEDULE = ("lr", "optim/global_steps")


@pytest.mark.slow
def test_skipped_micro_batch_keeps_the_optimiser_schedule(tiny_shapes, tiny_overrides, tmp_path):
    """grad_accum=2, micro-batch 0 of step 3 non-finite: the optimiser still steps at every
    step boundary with the LR of a run without the fault, and applies every update."""
    args = ["--steps", "10", "grad_accum=2"]
    clean, _ = _run(tmp_path, "clean", tiny_shapes, tiny_overrides, args)
    fault, r = _run(tmp_path, "fault", tiny_shapes, tiny_overrides, args, {"nan": [[3, 0]]})
    assert "step 3: non-finite loss" in r.stderr
    a, b = _losses(clean), _losses(fault)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for s in range(1, 11):
        for k in SCHEDULE:
            assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])
        assert b[s]["optim/global_steps"] == s
        assert b[s]["optim/skipped_steps"] == 0  # the other micro-batch's update was applied
        assert math.isfinite(b[s]["loss/total"]) or s == 3
    assert a[2]["loss/total"] == b[2]["loss/total"]  # identical until the fault
    faults = [json.loads(x) for x in (fault / "train_log.jsonl").read_text().splitlines()]
    assert [(x["step"], x["fault/skipped"]) for x in faults if "fault/ce" in x] == [(3, 1.0)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [None, 3])
def test_whole_step_skipped_keeps_the_lr_schedule(stage, tiny_shapes, tiny_overrides, tmp_path):
    """grad_accum=1 and step 3 non-finite: its update is discarded (by FiniteAdamW on the plain
    one-rank engine, by ZeRO-3's own check with zero_stage=3), yet step 4 onwards use the LR
    of their own step number, as the schedule defines it."""
    total = 8
    args = ["--steps", str(total)] + ([] if stage is None else [f"zero_stage={stage}"])
    out, _ = _run(tmp_path, "run", tiny_shapes, tiny_overrides, args, {"nan": [[3, 0]]})
    rec = _losses(out)
    for s in range(1, total + 1):
        assert rec[s]["lr"] == pytest.approx(lr_definition(s, total), rel=1e-12), s
        assert rec[s]["optim/global_steps"] == s
        assert rec[s]["optim/skipped_steps"] == (1 if s >= 3 else 0)


@pytest.mark.slow
def test_short_batch_is_split_not_truncated(tiny_shapes, tiny_overrides, tmp_path):
    """A 3-sample batch with grad_accum=4 trains (3 slices of one, one stand-in) and keeps
    the engine's step boundaries."""
    out, r = _run(
        tmp_path,
        "run",
        tiny_shapes,
        tiny_overrides,
        ["--steps", "5", "grad_accum=4"],
        {"short": {"2": 3}},
    )
    rec = _losses(out)
    for s in range(1, 6):
        assert rec[s]["optim/global_steps"] == s
        assert rec[s]["optim/skipped_steps"] == 0
        assert math.isfinite(rec[s]["loss/total"])


@pytest.mark.slow
@pytest.mark.parametrize("at", ["engine", "publish"])
def test_sigkill_inside_a_save_resumes_from_the_previous_one(
    at, tiny_shapes, tiny_overrides, tmp_path
):
    """Killed while checkpoint 8 is written: checkpoint 4 stays complete and resume uses it;
    the LR of every step, before and after the resume, is the schedule's definition."""
    total = 12
    args = ["--steps", str(total), "save_every=4", "keep_checkpoints=1"]
    out, r = _run(
        tmp_path,
        "run",
        tiny_shapes,
        tiny_overrides,
        args,
        {"kill_in_save": {"step": 8, "at": at}},
        check=False,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step00000004"
    assert (root / "step00000004" / "meta.json").is_file()
    assert not (root / "step00000008").exists()
    r = _resume(out)
    assert "at step 4" in r.stdout
    rec = _losses(out)
    assert sorted(rec) == list(range(1, total + 1))
    for s in range(1, total + 1):
        assert rec[s]["lr"] == pytest.approx(lr_definition(s, total), rel=1e-12), s
    assert not list(root.glob("*.tmp"))  # the killed save's leftovers are gone
    assert (root / "latest").read_text().strip() == f"step{total:08d}"


@pytest.mark.slow
def test_full_disk_while_saving_is_a_clear_error(tiny_shapes, tiny_overrides, tmp_path):
    args = ["--steps", "12", "save_every=4"]
    out, r = _run(
        tmp_path, "run", tiny_shapes, tiny_overrides, args, {"enospc_in_save": 8}, check=False
    )
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fastcap-train: error")]
    assert len(lines) == 1 and "No space left on device" in lines[0], r.stderr[-3000:]
    assert "step00000004 is intact" in lines[0]
    assert "Traceback" not in r.stderr
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step*")) == ["step00000004"]
    assert (root / "latest").read_text().strip() == "step00000004"
    r = _resume(out)
    assert "at step 4" in r.stdout


@pytest.mark.slow
def test_resume_with_an_incompatible_config_is_one_line_exit_2(
    tiny_shapes, tiny_overrides, tmp_path
):
    out, _ = _run(tmp_path, "run", tiny_shapes, tiny_overrides, ["--steps", "2"])
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["width"] = 96  # edited by hand
    (out / "config.json").write_text(json.dumps(cfg))
    before = sorted(p.name for p in out.rglob("*"))
    r = _resume(out, check=False, extra=["max_steps=4"])
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastcap-train: error"), r.stderr[-3000:]
    assert "config.json" in lines[0] and "step00000002" in lines[0]
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written
