"""Model selection breaks ties toward the later step: with 500 val images the semantic accuracy
moves in steps of 0.002, so equal scores are common, and the later weights have trained longer
(make train, 2026-12-02: val 0.992 at steps 624 and 936; best/ kept 624, test 0.979 against
0.996 for the last weights)."""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

from fastcap.bundle import read_bundle
from fastcap.model import Captioner, ModelConfig
from fastcap.train.selection import BestKeeper


def test_a_tie_keeps_the_later_weights(tmp_path, tiny_run):
    """main: offer(936, 0.992) after offer(624, 0.992) returned False; best/ stayed at 624."""
    mc = ModelConfig(image_size=32, width=32, heads=2, encoder_layers=1, embed_dim=16)
    state = Captioner(mc).state_dict()
    later = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    run = tmp_path / "run"
    run.mkdir()
    keep = BestKeeper(run, "semantic_acc", asdict(mc), tiny_run / "tokenizer.json")
    assert keep.offer(624, {"semantic_acc": 0.992}, state)
    assert keep.offer(936, {"semantic_acc": 0.992}, later)  # a tie: the later step
    assert keep.step == 936
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 936
    got, _, _ = read_bundle(run / "best")
    assert all(torch.equal(got[k], later[k]) for k in later)
    assert not keep.offer(1000, {"semantic_acc": 0.990}, state)  # worse: kept
    assert not keep.offer(1100, {"semantic_acc": float("nan")}, state)  # NaN never wins
    assert keep.step == 936
