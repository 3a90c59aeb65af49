"""Model selection keeps the later weights unless an earlier evaluation beat them by more than
the noise: with 500 val images the semantic accuracy moves in steps of 0.002, so equal scores
are common, and the later weights have trained longer (make train, 2026-12-02: val 0.992 at
steps 624 and 936; best/ kept 624, test 0.979 against 0.996 for the last weights)."""

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


def _keeper(tmp_path, tiny_run):
    mc = ModelConfig(image_size=32, width=32, heads=2, encoder_layers=1, embed_dim=16)
    run = tmp_path / "run"
    run.mkdir()
    keep = BestKeeper(run, "CIDEr-D", asdict(mc), tiny_run / "tokenizer.json")
    return keep, Captioner(mc).state_dict(), run


def test_within_the_noise_the_later_weights_win(tmp_path, tiny_run):
    """main kept step 200 (0.275) over step 300 (0.268 +- 0.018): the difference is a third of
    the evaluation's standard error. The highest value seen stays the bar, so a slow decline
    inside the noise cannot ratchet the kept weights down step by step."""
    keep, state, run = _keeper(tmp_path, tiny_run)
    assert keep.offer(200, {"CIDEr-D": 0.275, "CIDEr-D_se": 0.018}, state)
    assert keep.offer(300, {"CIDEr-D": 0.268, "CIDEr-D_se": 0.018}, state)
    assert (keep.step, keep.value, keep.top) == (300, 0.268, 0.275)
    assert keep.offer(400, {"CIDEr-D": 0.260, "CIDEr-D_se": 0.018}, state)  # 0.015 under top
    assert not keep.offer(500, {"CIDEr-D": 0.250, "CIDEr-D_se": 0.018}, state)  # 0.025 under
    assert not keep.offer(600, {"CIDEr-D": 0.268}, state)  # no noise figure: highest wins
    assert keep.step == 400
    again = BestKeeper(run, "CIDEr-D", keep.model_config, keep.tokenizer_path)  # resumed
    assert (again.step, again.value, again.top) == (400, 0.260, 0.275)
    assert not again.offer(700, {"CIDEr-D": 0.250, "CIDEr-D_se": 0.018}, state)


def test_standard_error_of_per_image_scores():
    """The noise selection allows for: the standard error of the mean of per-image scores."""
    from fastcap.train.evaluate import standard_error

    assert standard_error([1.0] * 10) == 0.0
    se = standard_error([1.0] * 496 + [0.0] * 4)  # 0.992 of 500
    assert abs(se - (0.992 * 0.008 / 499) ** 0.5) < 1e-12
    assert standard_error([0.3]) == 0.0
