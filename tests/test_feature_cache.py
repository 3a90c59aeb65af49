"""The frozen trunk's features, computed once: the cache folder's keys (trunk, weights, image
size, image bytes), what the trainer feeds the model from it, and exact resume with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastcap.data import features as F
from fastcap.model import ModelConfig
from fastcap.model.vision import VisionEncoder


def encoder(seed: int = 0, **kw) -> VisionEncoder:
    base = dict(
        image_size=32, width=32, heads=2, encoder_layers=0, trunk_norm="batch",
        trunk_stride=16, freeze_trunk=True,
    )  # fmt: skip
    base.update(kw)
    torch.manual_seed(seed)
    return VisionEncoder(ModelConfig(**base)).eval()


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_features_equal_the_trunk_in_fp16():
    enc, x = encoder(), images(5)
    feats, st = F.trunk_features(enc, x, device="cpu", batch_size=2)  # batches of 2, 2, 1
    assert feats.dtype == torch.float16 and feats.shape == (5, 256, 2, 2)
    assert st["computed"] == 5 and st["cached"] == 0 and st["file"] is None
    with torch.no_grad():
        want = enc.trunk_features(x)
    torch.testing.assert_close(feats.float(), want, rtol=1e-3, atol=1e-3)  # fp16's 3 digits
    assert not feats.equal(want.half().roll(1, 0))  # rows in image order


def test_cache_folder_keys_on_trunk_weights_size_and_image_bytes(tmp_path):
    enc, x = encoder(), images(4)
    a, st = F.trunk_features(enc, x, device="cpu", folder=tmp_path)
    assert st["computed"] == 4 and len(list(tmp_path.glob("*.safetensors"))) == 1
    b, st = F.trunk_features(enc, x, device="cpu", folder=tmp_path)  # all read back
    assert st["computed"] == 0 and st["cached"] == 4 and torch.equal(a, b)
    # one new image (one changed pixel): only it runs through the trunk
    y = x.clone()
    y[2, 0, 0, 0] ^= 1
    c, st = F.trunk_features(enc, y, device="cpu", folder=tmp_path)
    assert st["computed"] == 1 and torch.equal(c[[0, 1, 3]], a[[0, 1, 3]])
    # the same images, different trunk weights: another file, all recomputed
    other = encoder(seed=1)
    assert F.trunk_key(other) != F.trunk_key(enc)
    d, st = F.trunk_features(other, x, device="cpu", folder=tmp_path)
    assert st["computed"] == 4 and not torch.equal(d, a)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # weights moved by one ulp in one BatchNorm statistic: a different key
    nudged = encoder()
    rv = nudged.trunk[1].running_var
    rv[0] = torch.nextafter(rv[0], torch.tensor(2.0))
    assert F.trunk_key(nudged) != F.trunk_key(enc)
    # another image size or stage: a different key
    assert F.trunk_key(encoder(image_size=64)) != F.trunk_key(enc)
    assert F.trunk_key(encoder(trunk_stride=8)) != F.trunk_key(enc)
    assert F.trunk_key(encoder()) == F.trunk_key(enc)  # and the same trunk, the same key


def test_feature_table_and_eval_inputs_run_the_trunk_once(monkeypatch):
    enc, x = encoder(), images(6)
    feats, _ = F.trunk_features(enc, x, device="cpu")
    table = F.FeatureTable(feats, [10, 11, 12, 13, 14, 15])
    assert torch.equal(table.lookup([13, 10]), feats[[3, 0]])

    class Split:
        images = x

    class Model:
        vision = enc

    calls = []
    run = F.run_trunk
    monkeypatch.setattr(F, "run_trunk", lambda *a, **k: calls.append(1) or run(*a, **k))
    split = Split()
    for idx in (torch.tensor([0, 1]), torch.tensor([5]), torch.arange(6)):
        got = F.eval_inputs(Model(), split, idx, "cpu")
        assert torch.equal(got, feats[idx])
    assert len(calls) == 1
    enc.cfg.freeze_trunk = False  # a trunk that trains: the pixels themselves
    assert torch.equal(F.eval_inputs(Model(), split, torch.tensor([2]), "cpu"), x[[2]])
    enc.cfg.freeze_trunk = True


def _env():
    e = dict(os.environ, WANDB_MODE="disabled", FASTCAP_KERNELS="ref")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def _train(args, timeout=900):
    cmd = [sys.executable, "-m", "fastcap.cli.train", "--no-progress", "--wandb", "disabled"]
    r = subprocess.run(cmd + args, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _losses(run) -> dict[int, float]:
    out = {}
    for line in (run / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" in rec:
            out[int(rec["step"])] = rec["loss/total"]
    return out


@pytest.mark.slow
def test_trainer_uses_the_cache_and_resumes_exactly(tiny_shapes, tiny_overrides, tmp_path):
    """A frozen trunk's run feeds cached features (said on stdout); stopped after step 3 and
    resumed, it logs the uninterrupted run's losses for steps 4-6 and ends with its weights;
    with the cache off (the trunk at every step) the losses agree to fp16's precision."""
    common = [
        "--data", f"shapes:{tiny_shapes}", *tiny_overrides, "log_every=1", "save_every=3",
        "eval_every=100000", "data.eval_splits=", "diag_every=0", "model.trunk_norm=batch",
        "model.freeze_trunk=true", "model.dropout=0.1",
    ]  # fmt: skip
    full, part, off = tmp_path / "full", tmp_path / "part", tmp_path / "off"
    out = _train(["--out", str(full), "--steps", "6", *common])
    assert "features: 96 images, 96 through the frozen trunk" in out
    _train(["--out", str(part), "--steps", "3", *common])
    _train(["--resume", str(part), "--steps", "6", *common])  # from its step-3 checkpoint
    a, b = _losses(full), _losses(part)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    sa = torch.load(full / "model.pt", weights_only=False)["model"]
    sb = torch.load(part / "model.pt", weights_only=False)["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    _train(["--out", str(off), "--steps", "6", *common, "data.feature_cache=off"])
    c = _losses(off)
    assert c[1] == pytest.approx(a[1], rel=1e-3)
