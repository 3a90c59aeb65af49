"""bench/gpu_check.py: the dry run walks every stage, a stage that overruns its limit is killed
and recorded, and the analytic FLOP count behind MFU agrees with PyTorch's FLOP counter."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_walks_every_stage(tmp_path):
    out = tmp_path / "gc"
    env = dict(os.environ, FASTCAP_KERNELS="auto")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == list(gpu_check.STAGES)
    for stage, res in summary["stages"].items():
        assert (out / f"{stage}.json").is_file()
        assert res["status"] in ("ok", "skipped"), (stage, res.get("error"), res.get("reason"))
        if res["status"] == "skipped":
            assert res["reason"], stage
        for item in res["items"]:
            assert item["status"] in ("ok", "skipped"), (stage, item)
            if item["status"] == "skipped":
                assert item["reason"], (stage, item["name"])
    items = {i["name"]: i for s in summary["stages"].values() for i in s["items"]}
    # every kernel was checked in fp32 and fp16 (the interpreter's; bf16 needs a GPU)
    for kernel in ("attention/", "moe/triton/", "moe/triton+ext_align/", "siglip/"):
        for dt in ("float32", "float16"):
            hits = [i for n, i in items.items() if n.startswith(kernel) and n.endswith("/" + dt)]
            assert hits and all(i["status"] == "ok" for i in hits), (kernel, dt)
    bf16 = [i for n, i in items.items() if n.endswith("bfloat16")]
    want = "ok" if torch.cuda.is_available() else "skipped"
    assert bf16 and all(i["status"] == want for i in bf16)
    # every op was timed against its peers, and the training runs compared
    for prefix in ("attention/", "moe/", "siglip/"):
        assert any(n.startswith(prefix) and "ms" in i for n, i in items.items()), prefix
    cmp_ = items["train/compare"]
    assert cmp_["final_loss_auto"] == pytest.approx(cmp_["final_loss_ref"], abs=0.25)
    table = proc.stdout[proc.stdout.rindex("stage    status") :]  # the short table comes last
    assert all(stage in table for stage in gpu_check.STAGES)


def test_stage_over_its_limit_is_killed_and_recorded(tmp_path):
    a = argparse.Namespace(out=str(tmp_path), dry_run=True, quick=False)
    res = gpu_check._run_stage(a, "train", limit=0.5)
    assert res["status"] == "timeout" and "limit" in res["reason"]
    assert json.loads((tmp_path / "train.json").read_text())["status"] == "timeout"


def test_bf16_peak_lookup():
    assert gpu_check.bf16_peak_tflops("NVIDIA H200") == 989.5
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.bf16_peak_tflops("Some Future GPU") is None


@pytest.mark.parametrize(
    "trunk,size,stride,patch,L",
    [("resnet18", 64, 8, 1, 13), ("resnet34", 80, 16, 1, 7), ("resnet50", 96, 16, 3, 1 + 4)],
)
def test_model_flops_match_flop_counter(monkeypatch, trunk, size, stride, patch, L):
    """The analytic count against torch's FlopCounterMode on one forward of a dense model
    (the MoE reference pads experts to equal rows, so its counted FLOPs exceed the useful ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastcap.model import Captioner, ModelConfig

    monkeypatch.setenv("FASTCAP_KERNELS", "ref")
    cfg = ModelConfig(
        trunk=trunk,
        image_size=size,
        trunk_stride=stride,
        patch=patch,
        width=64,
        heads=4,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=2,
        vocab_size=37,
        embed_dim=32,
        max_len=L,
    )
    model = Captioner(cfg)
    B = 3
    images = torch.randn(B, 3, size, size)
    tokens = torch.randint(3, 37, (B, L))
    lens = torch.full((B,), L)
    with FlopCounterMode(display=False) as counter:
        model(images, tokens, lens)
    counted = counter.get_total_flops()
    # FlopCounterMode counts no FLOPs for scaled_dot_product_attention on the CPU (its CPU
    # kernels have no formula), so the attention score/value products leave the comparison
    N, d = (size // stride // patch) ** 2, cfg.width
    scores = cfg.encoder_layers * 4 * N * N * d + 3 * 4 * L * L * d + 2 * 4 * L * N * d
    want = gpu_check.model_flops_per_image(cfg, L) / 3 * B - scores * B
    # the rest differs by the SigLIP B x B products only (2 B^2 e FLOPs, left out on purpose)
    assert want == pytest.approx(counted, rel=1e-3), (want, counted)


@pytest.mark.parametrize("fault", ["scaled", "nan"])
def test_compare_catches_a_wrong_kernel(fault):
    """The correctness stage's comparison fails a kernel 1% off, or one leaving a NaN."""
    from fastcap.ops.ref.siglip import siglip_loss

    def make(dtype):
        img, txt = (torch.nn.functional.normalize(torch.randn(33, 16), dim=-1) for _ in "it")
        ls, lb = torch.tensor(2.3), torch.tensor(-10.0)
        return tuple(t.to(dtype).requires_grad_() for t in (img, txt, ls, lb)), [0, 1, 2, 3]

    def wrong(*args):
        loss = siglip_loss(*args)
        return loss * 1.01 if fault == "scaled" else loss + args[0][0, 0] * float("nan")

    names = ["loss", "dimg", "dtxt", "dscale", "dbias"]
    assert gpu_check._compare(siglip_loss, siglip_loss, make, torch.float32, names)
    with pytest.raises(AssertionError, match="FAIL" if fault == "scaled" else "nonfinite"):
        gpu_check._compare(wrong, siglip_loss, make, torch.float32, names)
