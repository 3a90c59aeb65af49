"""A trainer that loses nothing: SIGKILL mid-run and resume gives the same per-step losses as
an uninterrupted run; non-finite losses are skipped, logged, and stop the run when repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _env(faults=None):
    e = dict(os.environ)
    e.update({"WANDB_MODE": "disabled", "FASTCAP_KERNELS": "ref"})
    if faults is not None:
        e["FASTCAP_FAULTS"] = json.dumps(faults)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


FAULT_TRAIN = str(Path(__file__).with_name("fault_train.py"))


def _cmd(args, faults=None):
    """fastcap-train itself, or (with ``faults``) the same CLI with faults injected."""
    entry = ["-m", "fastcap.cli.train"] if faults is None else [FAULT_TRAIN]
    return [
        sys.executable,
        *entry,
        "--no-progress",
        "--wandb",
        "disabled",
        *args,
    ]


def _losses(run) -> dict[int, dict]:
    """step -> the last logged record for it (a resumed run re-logs the steps it redoes)."""
    out = {}
    for line in (run / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" in rec:
            out[int(rec["step"])] = rec
    return out


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_losses(tiny_shapes, tiny_overrides, tmp_path):
    common = [
        "--data",
        f"shapes:{tiny_shapes}",
        *tiny_overrides,
        "--steps",
        "16",
        "log_every=1",
        "save_every=4",
        "eval_every=100000",
        "data.eval_splits=",
        "tf.schedule=linear",
        "tf.end=0.6",
        "diag_every=0",
        "keep_checkpoints=3",
    ]
    full = tmp_path / "full"
    r = subprocess.run(
        _cmd(["--out", str(full), *common]), env=_env(), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    p = subprocess.Popen(
        _cmd(["--out", str(killed), *common]),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 600
    while time.time() < deadline:
        if latest.is_file() and latest.read_text().strip() == "step00000008":
            break
        if p.poll() is not None:
            pytest.fail("training finished before it could be killed")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # no chance to clean up
    p.wait()
    r = subprocess.run(
        _cmd(["--resume", str(killed)]), env=_env(), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(full), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for step in range(9, 17):  # bit-identical on CPU in fp32
        for k in ("loss/total", "loss/ce", "loss/clip", "tf/pred_share"):
            assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])


@pytest.mark.slow
def test_nan_is_skipped_then_repeated_nan_stops(tiny_shapes, tiny_overrides, tmp_path):
    common = [
        "--data",
        f"shapes:{tiny_shapes}",
        *tiny_overrides,
        "log_every=1",
        "eval_every=100000",
        "data.eval_splits=",
        "diag_every=0",
    ]
    one = tmp_path / "one"
    r = subprocess.run(
        _cmd(["--out", str(one), *common, "--steps", "6"], faults=True),
        env=_env({"nan": [[3, 0]]}),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3: non-finite loss" in r.stderr
    recs = [json.loads(x) for x in (one / "train_log.jsonl").read_text().splitlines()]
    faults = [x for x in recs if x.get("fault/skipped")]
    assert [int(x["step"]) for x in faults if "fault/ce" in x] == [3]
    finite = [x for x in recs if "loss/total" in x and int(x["step"]) != 3]
    assert all(x["loss/total"] == x["loss/total"] for x in finite)  # no NaN leaked into weights
    assert int(finite[-1]["step"]) == 6

    many = tmp_path / "many"
    r = subprocess.run(
        _cmd(
            [
                "--out",
                str(many),
                *common,
                "--steps",
                "20",
                "max_bad_steps=3",
            ],
            faults=True,
        ),
        env=_env({"nan": [[5, 0], [6, 0], [7, 0], [8, 0]]}),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 1
    assert "3 consecutive steps had a non-finite loss" in r.stderr
    assert (many / "checkpoints" / "latest").read_text().strip() == "step00000007"
    # the checkpoint holds the last good weights: resuming trains on with finite losses
    r = subprocess.run(
        _cmd(["--resume", str(many), "max_steps=9"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    last = _losses(many)
    assert last[9]["loss/total"] == last[9]["loss/total"]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_at_a_step_boundary(tiny_shapes, tiny_overrides, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(
        _cmd(
            [
                "--out",
                str(out),
                "--data",
                f"shapes:{tiny_shapes}",
                *tiny_overrides,
                "--steps",
                "100000",
                "log_every=1",
                "eval_every=100000",
                "save_every=100000",
                "diag_every=0",
            ]
        ),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = out / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.is_file() and len(log.read_text().split()) >= 3):
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 130, err[-3000:]
    assert "saving a checkpoint" in err
    tag = (out / "checkpoints" / "latest").read_text().strip()
    steps = _losses(out)
    assert int(tag.removeprefix("step")) == max(steps)  # saved exactly where it stopped
    r = subprocess.run(
        _cmd(["--resume", str(out), f"max_steps={max(steps) + 2}"]),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {max(steps)}" in r.stdout
