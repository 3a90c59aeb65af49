"""One full training step of the captioner under DeepSpeed (world size 1: the plain engine a
world of one gets): forward with every loss, backward, AdamW step; ``FASTCAP_KERNELS=ref``
against ``auto``. Below it, the one-rank engine overhead rows (bare PyTorch, ZeRO-3, the plain
engine, the trainer's step) and the trunk's memory format and normalisation.

    pytest bench/bench_step.py --benchmark-only -q

``extra_info`` holds images/s, tokens/s (decoder positions, bos and eos included), peak memory
and, on a GPU, model FLOPs utilisation: the analytic training FLOPs of
:func:`flops.model_flops_per_image` (nanoGPT's ``estimate_mfu`` idea with this model's
count) divided by the device's data-sheet dense bf16 peak.

GPU: the coco-base model (ResNet-50 at 384 px, width 768, 6+6+6 layers, 64 routed experts,
top-6) at batch 32, captions of 40 positions, bf16. CPU: the shapes-tiny model at batch 16,
fp32. On a CPU ``auto`` resolves to the references for CPU tensors, so both rows run the same
code (the group name says so); the pair shows the run-to-run noise of the machine.

The engine is built once per module (DeepSpeed's set-up costs seconds; on a fresh machine its
first CPU run also compiles a shared-memory op for about 90 s); only the kernel choice changes
between the rows, which never changes parameters.
"""

from __future__ import annotations

import resource

import pytest
import torch
from conftest import DEVICE
from flops import bf16_peak_tflops, model_flops_per_image

pytest.importorskip("deepspeed", reason="bench_step measures DeepSpeed training steps")

GPU = DEVICE == "cuda"
B = 32 if GPU else 16
CAPTION_LEN = 40 if GPU else 20


@pytest.fixture(scope="module")
def setup():
    from fastcap.model import Captioner
    from fastcap.train import engine as eng
    from fastcap.train.config import preset

    cfg = preset("coco-base" if GPU else "shapes-tiny")
    cfg.batch_size, cfg.checkpointing = B, False
    cfg.model.max_len = CAPTION_LEN
    _, world, device = eng.init_distributed()
    precision = eng.resolve_precision(cfg, device)
    torch.manual_seed(0)
    model = Captioner(cfg.model).to(device)
    engine = eng.build_engine(model, cfg, world, precision, total_steps=10**6)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return engine, cfg.model, precision, dtype


@pytest.mark.parametrize("kernels", ["ref", "auto"])
def test_train_step(measure, benchmark, monkeypatch, setup, kernels):
    engine, mcfg, precision, dtype = setup
    monkeypatch.setenv("FASTCAP_KERNELS", kernels)
    S, V, L = mcfg.image_size, mcfg.vocab_size, CAPTION_LEN
    # caption lengths L/2 .. L in a fresh order per input set: the sum, hence tokens/s, is fixed
    spread = L // 2 + torch.arange(B) % (L - L // 2 + 1)
    spread[0] = L  # the batch is padded to L

    def make_inputs():
        images = torch.randn(B, 3, S, S, device=DEVICE).to(dtype)
        lens = spread[torch.randperm(B)].to(DEVICE)
        tokens = torch.randint(3, V, (B, L), device=DEVICE)
        tokens[:, 0] = mcfg.bos_id
        tokens[torch.arange(B), lens - 1] = mcfg.eos_id
        pos = torch.arange(L, device=DEVICE)
        return images, tokens.masked_fill(pos[None, :] >= lens[:, None], mcfg.pad_id), lens

    def step(images, tokens, lens):
        out = engine(images, tokens, lens)
        engine.backward(out["loss"])
        engine.step()

    flops = model_flops_per_image(mcfg, L) * B
    same = "" if GPU else " (CPU: auto = ref, the same code)"
    group = f"train step one-rank engine {mcfg.trunk} {S}px B={B} L={L} {precision}{same}"
    median = measure(step, make_inputs, group=group, impl=kernels, flops=flops,
                     n_sets=2, rounds=5)  # fmt: skip
    if median is None:
        return
    benchmark.extra_info["images_per_s"] = round(B / median, 2)
    benchmark.extra_info["tokens_per_s"] = round(int(spread.sum()) / median, 1)
    benchmark.extra_info["model_tflop_per_step"] = round(flops / 1e12, 4)
    # ``peak_mem_mib`` is what one step adds above the memory held before it; the whole
    # footprint (weights, optimiser states, activations) is the high-water mark. On the CPU that
    # is the process's peak RSS (ru_maxrss, KiB on Linux): the allocator keeps freed pages.
    if not GPU:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        benchmark.extra_info["process_peak_mib"] = round(rss / 1024)
    else:
        # measure() reset the peak before its one memory call: this is that step's high-water mark
        benchmark.extra_info["process_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        peak = bf16_peak_tflops(torch.cuda.get_device_name())
        if peak is not None:
            benchmark.extra_info["mfu"] = round(flops / median / 1e12 / peak, 4)
        else:
            benchmark.extra_info["mfu"] = "unknown device peak"


# ---------------------------------------------------------------------- engine overhead at world 1
OVERHEAD_B = 128  # shapes-tiny's batch


@pytest.fixture(scope="module")
def one_rank_steps():
    """shapes-tiny at its batch of 128, fixed inputs, four ways to take the same optimiser step:
    bare PyTorch (forward with every loss, backward, clip, AdamW), DeepSpeed ZeRO-3, the engine
    a world of one gets (DeepSpeed's plain engine), and the trainer's own step on that engine
    (micro-batch split, uint8 -> normalised images, the non-finite vote, the logged terms)."""
    import copy

    from fastcap.data.records import Batch
    from fastcap.model import Captioner
    from fastcap.train import engine as eng
    from fastcap.train.config import preset
    from fastcap.train.step import StepRunner

    cfg = preset("shapes-tiny")
    mc = cfg.model
    mc.vocab_size = 96
    _, _, device = eng.init_distributed()
    torch.manual_seed(0)
    base = Captioner(mc).to(device)
    B, L, S = OVERHEAD_B, 20, mc.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (B, 3, S, S), generator=g, dtype=torch.uint8)
    lens = torch.randint(L // 2, L + 1, (B,), generator=g)
    lens[0] = L
    tokens = torch.randint(3, mc.vocab_size, (B, L), generator=g)
    tokens[:, 0], tokens[torch.arange(B), lens - 1] = mc.bos_id, mc.eos_id
    tokens = tokens.masked_fill(torch.arange(L)[None] >= lens[:, None], mc.pad_id)
    batch = Batch(pixels, tokens, lens, list(range(B)))
    images = pixels.to(device)  # uint8: the model normalises
    tokens_d, lens_d = tokens.to(device), lens.to(device)

    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(eng.param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=1e-8)  # fmt: skip

    def bare():
        out = model(images, tokens_d, lens_d)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def engine_step(stage):
        c = copy.deepcopy(cfg)
        c.batch_size, c.zero_stage = B, stage
        e = eng.build_engine(copy.deepcopy(base), c, 1, "fp32", 10**6)

        def step():
            out = e(images, tokens_d, lens_d)
            e.backward(out["loss"])
            e.step()

        return e, step

    _, zero3 = engine_step(3)
    plain_engine, plain = engine_step(None)
    runner = StepRunner(plain_engine, grad_accum=1, device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)

    def loop():
        runner.run(batch, p=1.0, generator=gen, capture=False, step=1)

    return {"bare": bare, "zero3": zero3, "engine": plain, "loop": loop}


@pytest.mark.skipif(GPU, reason="the world-of-one overhead is measured on the CPU here")
@pytest.mark.parametrize("side", ["zero3", "engine", "loop"])
def test_one_rank_overhead_vs_bare(benchmark, one_rank_steps, side):
    """Interleaved pairs (median of per-pair ratios; bench/conftest.py's interleaved_ratio).
    The engine a world of one gets must stay within 10% of bare PyTorch."""
    from conftest import interleaved_ratio

    r = interleaved_ratio(one_rank_steps[side], one_rank_steps["bare"], (), pairs=7,
                          min_sample_s=0.0)  # fmt: skip
    benchmark.extra_info.update(
        {f"ratio_to_bare_{k}": round(v, 3) for k, v in r.items() if k in ("median", "min", "max")}
    )
    benchmark.extra_info["images_per_s"] = round(OVERHEAD_B / r["slow_s"], 1)
    benchmark.extra_info["bare_images_per_s"] = round(OVERHEAD_B / r["fast_s"], 1)
    benchmark.pedantic(lambda: None, rounds=1)  # the figures are the extra_info above
    print(f"\n{side}/bare: median {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
    if side == "engine":
        assert r["median"] < 1.10, r


@pytest.mark.skipif(GPU, reason="measured on the CPU here; the GPU check times the GPU step")
@pytest.mark.parametrize("variant", ["contiguous_input", "batchnorm_trunk"])
def test_trunk_choices(benchmark, variant):
    """The captioner's forward + backward at shapes-tiny's batch of 128, against what
    VisionEncoder does (channels-last images into a GroupNorm trunk): the same model fed
    contiguous images (the trunk's convolutions then run in NCHW), or a BatchNorm trunk.
    Ratio > 1: the variant is slower."""
    import copy

    from conftest import interleaved_ratio

    from fastcap.model import Captioner
    from fastcap.model import vision as vision_mod
    from fastcap.train.config import preset

    mc = preset("shapes-tiny").model
    mc.vocab_size = 96
    torch.manual_seed(0)
    ours = Captioner(mc)
    B, L = OVERHEAD_B, 20
    x = torch.randn(B, 3, mc.image_size, mc.image_size)
    lens = torch.full((B,), L)
    tokens = torch.randint(3, 96, (B, L))
    tokens[:, 0], tokens[:, -1] = mc.bos_id, mc.eos_id

    def run(m):
        m(x, tokens, lens)["loss"].backward()
        m.zero_grad(set_to_none=True)

    if variant == "batchnorm_trunk":
        bn = copy.deepcopy(mc)
        bn.trunk_norm = "batch"
        other = Captioner(bn)
        r = interleaved_ratio(lambda: run(other), lambda: run(ours), (), pairs=7)
    else:

        def nchw_run():  # the trunk sees the images as they come (NCHW)
            vision_mod.CHANNELS_LAST = False
            try:
                run(ours)
            finally:
                vision_mod.CHANNELS_LAST = True

        r = interleaved_ratio(nchw_run, lambda: run(ours), (), pairs=7)
    benchmark.extra_info.update({f"slowdown_{k}": round(r[k], 3) for k in ("median", "min", "max")})
    benchmark.pedantic(lambda: None, rounds=1)
    print(f"\n{variant} / ours: median {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
