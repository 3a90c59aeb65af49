"""Rank 0 alone scores the final weights; the other ranks leave once the weights are saved and
gathered, instead of waiting for it in a barrier that the process group's timeout (30 minutes
by default) ends: a final evaluation longer than that killed the run before metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_train import run_two_ranks


def test_a_final_evaluation_longer_than_the_timeout_finishes(tiny_shapes, tiny_overrides, tmp_path):
    """main: rank 1 waited in barrier() after the final save, timed out after 8 s (gloo
    'Timed out waiting'), torchrun stopped rank 0 mid-evaluation: no metrics.json."""
    out = tmp_path / "run"
    r = run_two_ranks(
        [str(Path(__file__).with_name("slow_final_eval.py"))],
        [
            "--data",
            f"shapes:{tiny_shapes}",
            "--out",
            str(out),
            *tiny_overrides,
            "--steps",
            "2",
            "select_metric=none",
            "eval_every=100000",
            "save_every=100000",
            "data.eval_splits=test",
            "diag_every=0",
        ],  # fmt: skip
        env={"FASTCAP_PG_TIMEOUT": "8", "FASTCAP_EVAL_SLEEP": "20"},
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test" in metrics and metrics["selection"]["scored"] == "last"
