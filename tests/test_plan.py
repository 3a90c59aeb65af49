"""fastcap.plan and ``fastcap-train --plan``: parameter counts, FLOPs, saved activations and
optimiser memory against real models and hand counts; the CLI touches nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastcap import measure, plan
from fastcap.flops import captioner_forward_flops
from fastcap.model import Captioner, ModelConfig, MoEConfig
from fastcap.train.config import PRESETS, ConfigError, build
from fastcap.train.parallelize import apply_activation_checkpointing

# Smaller than the tests' tiny run: resnet18 cut at stride 8 (conv1 .. layer2) on 32 px images,
# 4 x 4 = 16 image tokens, width 32 (2 heads), one layer of each kind, 40 tokens.
SMALL = dict(
    trunk="resnet18",
    trunk_stride=8,
    image_size=32,
    width=32,
    heads=2,
    encoder_layers=1,
    unimodal_layers=1,
    multimodal_layers=1,
    vocab_size=40,
    embed_dim=16,
    max_len=8,
)


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw})


def test_param_counts_match_model_and_hand_count():
    cfg = small()
    assert cfg.ffn_hidden == 96  # int(32 * 8 / 3) = 85, rounded up to a multiple of 32
    d, h, e, V = 32, 96, 16, 40
    # resnet18 up to layer2, GroupNorm (its affine weight + bias per channel, as BatchNorm's)
    conv1 = 3 * 64 * 7 * 7 + 2 * 64
    layer1 = 2 * 2 * (64 * 64 * 9 + 2 * 64)
    layer2 = (64 * 128 * 9 + 2 * 128) + (128 * 128 * 9 + 2 * 128) + (64 * 128 + 2 * 128)
    layer2 += 2 * (128 * 128 * 9 + 2 * 128)
    trunk = conv1 + layer1 + layer2
    attn = 4 * d * d  # q (d, d), kv (d, 2d), o (d, d)
    ffn = d * 2 * h + h * d
    layer = d + attn + d + ffn  # norm1, attention, norm2, SwiGLU
    encoder = (128 * d + d) + 2 * 4 * d + layer + d + d * e  # proj, pos tables, layer, norm, embed
    decoder = layer + (layer + d + attn) + d + d * e + d  # uni, multi (+ norm_c, cross), heads
    embeddings = V * d
    want = trunk + encoder + decoder + embeddings + 2  # + logit_scale, logit_bias

    p = plan.count_params(measure.build_meta(cfg))
    real = Captioner(cfg)
    assert p.total == sum(q.numel() for q in real.parameters()) == want
    assert (p.trunk, p.encoder, p.decoder, p.embeddings, p.other) == (
        trunk,
        encoder,
        decoder,
        embeddings,
        2,
    )
    assert p.trunk == 683_072  # also: torchvision's own resnet18 up to layer2
    assert p.trainable == p.total == p.active_per_token and p.routed_experts == 0


def test_active_params_per_token_moe_by_hand():
    moe = MoEConfig(enabled=True, num_experts=4, top_k=1, num_shared=1, expert_hidden=16)
    cfg, dense = small(moe=moe), small()
    d, f, E = 32, 16, 4
    # layer 0 stays dense (first_dense); layer 1's SwiGLU (d -> 2*96 -> d) becomes the MoE block
    block = E * d + E * d * 2 * f + E * f * d + (d * 2 * f + f * d)  # router, w13, w2, shared
    p = plan.count_params(measure.build_meta(cfg))
    total = plan.count_params(measure.build_meta(dense)).total - (d * 2 * 96 + 96 * d) + block
    assert p.total == total == sum(q.numel() for q in Captioner(cfg).parameters())
    assert p.routed_experts == E * 3 * d * f
    assert p.active_per_token == total - (E - 1) * 3 * d * f  # 3 of the 4 experts idle


def test_flops_hand_count_and_flop_counter():
    cfg, L = small(), 8
    d, h, N, V, e = 32, 96, 16, 40, 16
    trunk = 2 * 3 * 64 * 49 * 16 * 16  # conv1, 16 x 16 out; max pool -> 8 x 8
    trunk += 4 * 2 * 64 * 64 * 9 * 8 * 8  # layer1
    trunk += 2 * 64 * 128 * 9 * 4 * 4 + 3 * 2 * 128 * 128 * 9 * 4 * 4 + 2 * 64 * 128 * 4 * 4
    encoder = 2 * 128 * d * N  # 1x1 projection
    encoder += 4 * 2 * N * d * d + 4 * N * N * d + 6 * N * d * h  # q k v o, scores+values, SwiGLU
    encoder += 2 * d * e  # pooled embedding
    uni = 4 * 2 * L * d * d + 4 * L * L * d + 6 * L * d * h
    multi = uni + 2 * 2 * L * d * d + 2 * 2 * N * d * d + 4 * L * N * d  # + cross-attention
    head = 2 * (L - 1) * V * d + 2 * d * e
    got = captioner_forward_flops(cfg, L)
    assert got == {
        "trunk": trunk,
        "encoder": encoder,
        "unimodal": uni,
        "multimodal": multi,
        "head": head,
    }
    total = trunk + encoder + uni + multi + head
    counted = measure.counted_forward_flops(cfg, L)
    assert counted == pytest.approx(total, rel=0.03), (counted, total)


def _cpu_bytes(cfg: ModelConfig, B: int, L: int, dtype, tf_p: float) -> tuple[int, int]:
    torch.manual_seed(0)
    model = Captioner(cfg).to(dtype)
    inputs = measure.example_batch(cfg, B, L, "cpu", dtype)
    plain = measure.saved_activation_bytes(model, *inputs, tf_p=tf_p)
    apply_activation_checkpointing(model)
    return plain, measure.saved_activation_bytes(model, *inputs, tf_p=tf_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tf_p", [1.0, 0.5])
def test_activation_bytes_meta_equal_cpu(tiny_overrides, dtype, tf_p):
    cfg = build("shapes-tiny", overrides=tiny_overrides).model
    B, L = 4, 12
    meta = measure.measure_activations(cfg, B, L, dtype, tf_p=tf_p)
    assert meta[1] < meta[0]
    assert meta == _cpu_bytes(cfg, B, L, dtype, tf_p)


def test_activation_bytes_moe_close_to_cpu(tiny_overrides):
    """Meta routes round-robin; a real router does not, and the reference pads each expert's
    rows to the busiest one: equal with checkpointing, within a few % without."""
    cfg = build("shapes-tiny", overrides=tiny_overrides + ["model.moe.enabled=true"]).model
    meta = measure.measure_activations(cfg, 4, 12, torch.float32)
    cpu = _cpu_bytes(cfg, 4, 12, torch.float32, 1.0)
    assert meta[1] == cpu[1] and meta[0] == pytest.approx(cpu[0], rel=0.03)


def test_optimizer_bytes_by_hand():
    assert plan.optimizer_bytes(1000) == 16_000
    # 100 persistent parameters kept whole (2 B), the other 900 split 8 ways, grads and AdamW
    # (2 + 12 B) split 8 ways for all 1000
    assert plan.optimizer_bytes(1000, 100, 8) == 2 * 100 + 2 * 900 / 8 + 14 * 1000 / 8


def test_plan_epoch_from_default_and_from_data(tiny_shapes, tmp_path):
    cfg = build("coco-base", overrides=[f"data.data=karpathy:{tmp_path}/none.json"])
    p = plan.make_plan(cfg, mfu=0.5, cross_check=False)
    assert p.data == plan.KARPATHY_TRAIN and p.epoch_unit == "caption"
    assert p.steps_per_epoch == 5 * 113_287 // 256 and p.total_steps == int(5 * p.steps_per_epoch)
    want = p.steps_per_epoch * 256 * p.flops_train / (312e12 * 0.5)
    assert p.epoch_seconds["A100"] == pytest.approx(want)
    text = plan.format_plan(p)
    assert "documented default" in text and "50% MFU" in text

    cfg = build("shapes-tiny", overrides=[f"data.data=shapes:{tiny_shapes}", "batch_size=16"])
    p = plan.make_plan(cfg, cross_check=False)
    assert (p.data.images, p.data.captions) == (96, 288) and "read from" in p.data.source
    assert p.steps_per_epoch == 96 // 16  # epoch_unit image


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_and_plans(name):
    cfg = build(name)  # validates
    model = measure.build_meta(cfg.model)
    assert all(p.is_meta for p in model.parameters())
    p = plan.make_plan(cfg, cross_check=False)
    assert p.params.total == sum(q.numel() for q in model.parameters())
    assert 0 < p.activations_ckpt < p.activations and p.steps_per_epoch > 0


def test_cli_plan_touches_nothing(tmp_path):
    code = (
        "import sys\n"
        "from fastcap.cli.train import main\n"
        "rc = main(['--preset', 'coco-base', '--plan'])\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    for line in ("fastcap-train --plan: coco-base", "active per token", "FLOPs per image"):
        assert line in r.stdout
    assert "time on 1 A100" in r.stdout and "ZeRO-3 x 8" in r.stdout
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- --plan-gpu


def test_plan_gpu_spec():
    assert plan.parse_plan_gpu("t4") == (plan.PLAN_GPUS["t4"], 1)
    assert plan.parse_plan_gpu("2xT4") == (plan.PLAN_GPUS["t4"], 2)
    assert plan.parse_plan_gpu("8xh100") == (plan.PLAN_GPUS["h100"], 8)
    for bad in ("v100", "0xt4", "twoxt4", "2x", ""):
        with pytest.raises(ConfigError, match="--plan-gpu"):
            plan.parse_plan_gpu(bad)


@pytest.mark.parametrize("key", sorted(plan.PLAN_GPUS))
def test_plan_gpu_precision_is_the_policys(key):
    """The plan's precision for a GPU is what the capability policy picks on it."""
    from fastcap.common import capability

    with capability.simulate(key):
        want = capability.precision_for(torch.device("cuda", 0))
    assert plan.gpu_precision(plan.PLAN_GPUS[key].info) == want
    assert want == ("fp16" if key == "t4" else "bf16")


def test_plan_gpu_memory_and_time():
    """2 x T4: fp16, the batch split over two ranks and the accumulation steps, ZeRO-3 over 2,
    the margin against 15 GiB, and half the time of one T4 at the T4's fp16 peak."""
    cfg = build("shapes-tiny", None, ["batch_size=64", "grad_accum=2"])
    one = plan.make_plan(cfg, cross_check=False, gpu="t4")
    two = plan.make_plan(cfg, cross_check=False, gpu="2xt4")
    assert two.precision == one.precision == "fp16"
    assert (one.micro_batch, two.micro_batch) == (32, 16)
    f = two.fit
    assert f.ranks == 2 and f.memory == 15 * 2**30 and f.activations == two.activations
    persistent = sum(
        p.numel()
        for p in measure.build_meta(cfg.model).parameters()
        if p.numel() < cfg.zero_persistence_threshold
    )
    assert f.optimizer == plan.optimizer_bytes(two.params.total, persistent, 2)
    assert one.fit.optimizer == 20.0 * one.params.total  # stage 0, fp16: fp32 grads too
    assert f.need == f.optimizer + f.activations + plan.ALLOWANCE
    assert f.margin == f.memory - f.need > 0
    (t1,), (t2,) = one.epoch_seconds.values(), two.epoch_seconds.values()
    assert t2 == pytest.approx(t1 / 2)
    per_sample = 3.0 * one.flops_forward + one.flops_tf_extra
    assert t1 == pytest.approx(one.steps_per_epoch * 64 * per_sample / (65.0e12 * plan.DEFAULT_MFU))
    text = plan.format_plan(two)
    assert "2 x Tesla T4 (sm_75), 15.00 GiB each: fp16" in text and ": fits" in text
    with pytest.raises(ConfigError, match="does not divide"):
        plan.make_plan(build("shapes-tiny", None, ["batch_size=6", "grad_accum=2"]),
                       cross_check=False, gpu="2xt4")  # fmt: skip


def test_cli_plan_gpu_says_whether_it_fits():
    r = subprocess.run(
        [sys.executable, "-m", "fastcap.cli.train", "--preset", "coco-base", "--plan",
         "--plan-gpu", "2xt4", "batch_size=256"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "does NOT fit" in r.stdout and "time on 2 x T4" in r.stdout  # 128 images a rank
