"""best/ by a validation score: replaced only by a strictly better one, whole or not at all,
read back on resume; and the final metrics.json layout."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
import torch

from fastcap.bundle import read_bundle
from fastcap.data.records import Record
from fastcap.model import Captioner, ModelConfig
from fastcap.train.evaluate import write_metrics
from fastcap.train.selection import BestKeeper, resolve_metric


@pytest.fixture
def parts(tmp_path, tiny_run):
    """(run folder, model config dict, a tokenizer file, a state dict)."""
    mc = ModelConfig(image_size=32, width=32, heads=2, encoder_layers=1, embed_dim=16)
    return tmp_path / "run", asdict(mc), tiny_run / "tokenizer.json", Captioner(mc).state_dict()


def _value(run) -> tuple[int, float]:
    meta = json.loads((run / "best" / "best.json").read_text())
    return meta["step"], meta["value"]


def test_best_is_kept_only_for_a_strictly_better_score(parts):
    run, mc, tok, state = parts
    run.mkdir()
    keep = BestKeeper(run, "CIDEr-D", mc, tok)
    assert keep.offer(10, {"CIDEr-D": 0.5, "BLEU-4": 0.1}, state)
    marked = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    assert not keep.offer(20, {"CIDEr-D": 0.4}, marked)  # worse
    assert not keep.offer(40, {"CIDEr-D": float("nan")}, marked)
    assert _value(run) == (10, 0.5) and keep.step == 10
    got, _, _ = read_bundle(run / "best")
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert keep.offer(50, {"CIDEr-D": 0.7}, marked)
    got, _, _ = read_bundle(run / "best")
    assert all(torch.equal(got[k], marked[k]) for k in state)
    assert _value(run) == (50, 0.7)
    assert sorted(p.name for p in run.iterdir()) == ["best"]  # no tmp or old folder left
    # a resumed run reads the kept value back: 0.6 does not replace 0.7
    again = BestKeeper(run, "CIDEr-D", mc, tok)
    assert again.step == 50 and not again.offer(60, {"CIDEr-D": 0.6}, state)
    with pytest.raises(KeyError, match="select_metric 'BLEU-4' is not among"):
        BestKeeper(run, "BLEU-4", mc, tok).offer(70, {"CIDEr-D": 1.0}, state)
    assert not BestKeeper(run, "none", mc, tok).offer(80, {"CIDEr-D": 9.0}, state)


def test_a_crash_between_the_renames_keeps_the_previous_best(parts):
    run, mc, tok, state = parts
    run.mkdir()
    BestKeeper(run, "CIDEr-D", mc, tok).offer(10, {"CIDEr-D": 0.5}, state)
    os.replace(run / "best", run / "best.old")  # the old best moved aside, the new not yet in
    keep = BestKeeper(run, "CIDEr-D", mc, tok)
    assert keep.step == 10 and (run / "best" / "model.safetensors").is_file()
    assert not (run / "best.old").exists()


def test_metrics_json_holds_best_at_the_top_and_last_beside(tmp_path):
    best = {"test": {"CIDEr-D": 1.0}}
    last = {"test": {"CIDEr-D": 0.8}}
    sel = {"metric": "CIDEr-D", "best_step": 5, "last_step": 9, "scored": "best"}
    m = write_metrics(tmp_path, best, last, sel)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    assert m["test"] == best["test"] and m["last"] == last and m["selection"] == sel
    m = write_metrics(tmp_path, None, last, {**sel, "scored": "last"})
    assert m["test"] == last["test"] and m["last"] == last


def test_auto_selects_semantic_accuracy_on_shapes_only(tmp_path):
    class Split:
        def __init__(self, shapes: bool):
            meta = {"objects": []} if shapes else {}
            self.records = [
                Record(i, tmp_path / f"{i}.png", ["a"], "val", dict(meta)) for i in (1, 2)
            ]

    assert resolve_metric("auto", Split(True)) == "semantic_acc"
    assert resolve_metric("auto", Split(False)) == "CIDEr-D"
    assert resolve_metric("auto", None) == "CIDEr-D"
    assert resolve_metric("BLEU-4", Split(True)) == "BLEU-4"
    with pytest.raises(ValueError, match="select_metric semantic_acc needs the shapes data"):
        resolve_metric("semantic_acc", Split(False))
