"""Every documented ``FASTCAP_KERNELS`` value trains: three steps of the tiny captioner through
``fastcap-train`` itself, the Triton kernels running in the interpreter on this CPU."""

from __future__ import annotations

import json
import os

import pytest
from test_train import run_train

# the values the README's table documents (the per-op example included), and each op alone
VALUES = [
    "auto",
    "ref",
    "triton",
    "attention=ref,moe=triton",
    "ref,attention=triton",
    "ref,moe=triton",
    "ref,siglip=triton",
    "ref,lce=triton",
]
MOE = ["model.moe.enabled=true", "model.moe.num_experts=4", "model.moe.expert_hidden=32"]


def _train(tmp_path, tiny_shapes, tiny_overrides, value, extra=()):
    out = tmp_path / "run"
    r = run_train(
        [
            "--data",
            f"shapes:{tiny_shapes}",
            "--out",
            str(out),
            *tiny_overrides,
            *extra,
            "--steps",
            "3",
            "log_every=1",
            "eval_every=100000",
            "data.eval_splits=",
            "diag_every=0",
        ],
        env={"FASTCAP_KERNELS": value, "TRITON_INTERPRET": "1"},
        timeout=900,
    )
    return out, r


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="a GPU machine runs these in make gpu-check"
)
@pytest.mark.parametrize("value", VALUES)
def test_every_documented_value_trains(value, tiny_shapes, tiny_overrides, tmp_path):
    out, r = _train(tmp_path, tiny_shapes, tiny_overrides, value, MOE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"kernels: {value}" in r.stdout
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [x["loss/total"] for x in log if "loss/total" in x]
    assert len(losses) == 3 and all(x == x for x in losses), losses


@pytest.mark.slow
def test_bare_cuda_forces_the_extension_and_says_what_it_leaves(
    tiny_shapes, tiny_overrides, tmp_path
):
    """Only moe has a cuda implementation: on a dense model a bare ``cuda`` leaves every op at
    auto and logs it; on a MoE model on a CPU, moe=cuda cannot run and says so."""
    out, r = _train(tmp_path, tiny_shapes, tiny_overrides, "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    for op in ("attention", "siglip", "lce"):
        assert f"{op} has no 'cuda' implementation" in r.stdout + r.stderr
    (tmp_path / "run").rename(tmp_path / "dense")
    _, r = _train(tmp_path, tiny_shapes, tiny_overrides, "cuda", MOE)
    assert r.returncode == 2, r.stderr[-3000:]  # refused before any work, in one line
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fastcap-train: error")]
    assert len(lines) == 1 and "moe=cuda needs CUDA tensors" in lines[0], r.stderr[-3000:]
    assert not (tmp_path / "run").exists()
