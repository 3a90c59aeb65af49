"""fastcap's GPU paths on fake CUDA tensors (tests/fake_cuda.py): an A100 (sm_80), an H100
(sm_90) and a T4 (sm_75) simulated for the capability policy, each case seconds on a CPU.

What each case covers (the module docstring of tests/fake_cuda.py lists what cannot run this
way and why):

* ``test_captioner``: the captioner, dense and MoE, forward (teacher forcing's two passes, the
  diagnostics) and backward with every loss, in the policy's precision and through ``auto``
  dispatch: the Triton custom ops' fake impls on sm_80/sm_90, the references on sm_75 (LCE:
  Triton). Every parameter gets a gradient of its own device and dtype.
* ``test_train_step``: :class:`fastcap.train.step.StepRunner` around a stand-in engine: the
  micro-batches moved and cast as ``to_micro`` does, the non-finite vote and the logged means
  of ``collectives.py`` at a world of two (each tensor handed to a collective on the GPU, as
  NCCL requires).
* ``test_decoding``: greedy, beam and top-p sampling with the KV cache (dense and MoE): outputs
  on the GPU, and host synchronisations only where the decoders document them (a look for
  finished rows every few steps, the final length).
* ``test_static_decoding``: greedy and beam static decoding through the CUDA-graph path, with
  stand-ins for streams and graphs: the captured step makes no host read and no CPU tensor.
* ``test_scst``: the SCST objective inside the model's forward (sampling without gradient, the
  teacher-forced pass, the policy-gradient loss) and its backward.
* ``test_load_and_caption``: ``fastcap.load(..., device="cuda")`` picks the policy's dtype,
  ``.caption`` greedy and beam, and the server's batch call (``_prepare`` and
  ``caption_prepared``), greedy and seeded sampling (per-image streams drawn on the device).
* ``test_planted_fault``: faults planted into the code (a CPU tensor in the decoder's mask,
  fp32 pixels into a bf16 trunk, an RMSNorm that returns fp32, a KV cache on the CPU, a
  collective's tensor on the CPU, the MoE's output in fp32, a custom op's gradient on the
  CPU): each makes the run that covers it fail with a device or dtype error.
"""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest
import torch
from fake_cuda import FakeGPU, fake_devices, site
from PIL import Image

from fastcap.common import capability
from fastcap.model import Captioner, ModelConfig, MoEConfig
from fastcap.ops import dispatch

V, S, MAX_LEN = 40, 32, 16
GPUS = ("a100", "h100", "t4")
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# What each fake GPU must get from the capability policy (issue 22): precision, and what
# ``auto`` runs for each op.
EXPECTED = {
    "a100": ("bf16", {"attention": "triton", "moe": "triton", "siglip": "triton", "lce": "triton"}),
    "h100": ("bf16", {"attention": "triton", "moe": "triton", "siglip": "triton", "lce": "triton"}),
    "t4": ("fp16", {"attention": "ref", "moe": "ref", "siglip": "ref", "lce": "triton"}),
}
# CPU tensors the GPU path makes on purpose: scheduled sampling's draws come from a CPU
# generator (part of the resumable state, the same on every device), then move once.
CPU_ALLOWED = {"fastcap/model/captioner.py:mix_inputs"}
# fp32 GEMMs in a bf16/fp16 model that are meant: the router's logits (fastcap/model/moe.py),
# the diagnostics' attention probabilities, the reference SigLIP's (B, B) logits; and SDPA's
# math fallback, which the fake mode selects where a real T4 runs the memory-efficient kernel.
FP32_ALLOWED = {
    "fastcap/model/moe.py:forward",
    "fastcap/ops/ref/attention.py:attention_probs",
    "fastcap/ops/ref/attention.py:attention",
    "fastcap/ops/ref/siglip.py:siglip_loss",
}


def tiny_cfg(moe: bool = False) -> ModelConfig:
    return ModelConfig(
        image_size=S,
        trunk_stride=8,
        width=64,
        heads=4,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=1,
        vocab_size=V,
        max_len=MAX_LEN,
        embed_dim=32,
        moe=MoEConfig(enabled=moe, num_experts=4, top_k=2, expert_hidden=32),
    )


def make_model(moe: bool = False, seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    return Captioner(tiny_cfg(moe))


def batch(B: int = 4, L: int = 10, seed: int = 0):
    """Real CPU tensors: normalised images (B, 3, S, S), tokens (B, L), lens (B,)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, S, S, generator=g)
    lens = torch.randint(4, L + 1, (B,), generator=g)
    lens[0] = L
    tokens = torch.randint(3, V, (B, L), generator=g)
    tokens[:, 0] = 1
    tokens[torch.arange(B), lens - 1] = 2
    tokens = tokens.masked_fill(torch.arange(L)[None, :] >= lens[:, None], 0)
    return images, tokens, lens


def policy_dtype(g: FakeGPU) -> torch.dtype:
    return DTYPE[capability.precision_for(g.device)]


def check_clean(g: FakeGPU) -> None:
    """No CPU tensor and no fp32 GEMM on the GPU path beyond the documented ones."""
    cpu = {w: ops for w, ops in g.cpu_made.items() if site(w) not in CPU_ALLOWED}
    assert not cpu, f"CPU tensors made on the GPU path: {cpu}"
    fp32 = {w: ops for w, ops in g.fp32_gemms.items() if site(w) not in FP32_ALLOWED}
    assert not fp32, f"fp32 GEMMs in a {g.compute_dtype} model: {fp32}"


def check_grads(model, grads: dict, dtype: torch.dtype) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p not in grads]
    assert not missing, f"no gradient for {missing}"
    for p, gr in grads.items():
        assert gr.device == p.device and gr.dtype == p.dtype == dtype, (gr.device, gr.dtype)
        assert gr.shape == p.shape


# ---------------------------------------------------------------------- the captioner
def run_captioner(gpu: str, moe: bool) -> FakeGPU:
    model = make_model(moe)
    images, tokens, lens = batch()
    with FakeGPU(gpu) as g:
        precision, impls = EXPECTED[gpu]
        assert capability.precision_for(g.device) == precision
        dt = policy_dtype(g)
        g.to_cuda(model, dt)
        assert {op: dispatch.resolve(op, g.device) for op in dispatch.OPS} == impls
        out = model(g.fake(images, dtype=dt), g.fake(tokens), g.fake(lens), tf_p=0.5, capture=True)
        for k in ("loss", "ce", "clip", "aux", "tf_pred"):
            assert out[k].device == g.device and out[k].dtype == torch.float32, k
            assert out[k].dim() == 0, k
        assert fake_devices(out) == {"cuda:0"}, "a diagnostic left the GPU"
        grads = g.backward(out["loss"])
    check_grads(model, grads, dt)
    check_clean(g)
    # the reference MoE (the T4's) reads its largest expert's row count: a sync per layer
    assert all("fastcap/ops/ref/moe.py" in w for _, w in g.host_reads), g.host_reads
    return g


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("gpu", GPUS)
def test_captioner(gpu, moe, caplog):
    with caplog.at_level(logging.INFO, logger="fastcap"):
        run_captioner(gpu, moe)
    # auto's choice is logged once per op with the policy's reason (logged at the first
    # choice of the process: another test may have made it before this one)
    logged = [r.getMessage() for r in caplog.records if "(auto)" in r.getMessage()]
    if logged:
        for op, impl in EXPECTED[gpu][1].items():
            if any(f"fastcap.ops: {op} -> " in m for m in logged):
                assert any(m.startswith(f"fastcap.ops: {op} -> {impl} (auto)") for m in logged)


# ---------------------------------------------------------------------- the training step
class StandInEngine:
    """What StepRunner needs of a DeepSpeed engine: forward, backward (the fake walker),
    step; the loss scaler and the optimizer are DeepSpeed's and do not run here."""

    def __init__(self, module, g: FakeGPU):
        self.module, self.g = module, g
        self.grads: list[dict] = []
        self.steps = 0
        self.lr_scheduler = type("Sched", (), {"step": lambda self: None})()

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self):
        self.module.train()

    def backward(self, loss):
        assert loss.device == self.g.device and loss.dtype == torch.float32
        self.grads.append(self.g.backward(loss))

    def step(self):
        self.steps += 1

    def get_lr(self):
        return [1e-3]

    def was_step_applied(self):
        return True


@pytest.mark.parametrize("gpu", ["a100", "t4"])
def test_train_step(gpu, monkeypatch):
    run_train_step(gpu, monkeypatch)


def run_train_step(gpu: str, monkeypatch) -> FakeGPU:
    from fastcap.data.records import Batch
    from fastcap.train import collectives
    from fastcap.train.step import StepRunner, to_micro

    model = make_model()
    _, tokens, lens = batch(B=6)
    u8 = torch.randint(0, 256, (6, 3, S, S), dtype=torch.uint8)
    handed: list[torch.Tensor] = []

    def all_reduce(t, op=None, group=None):  # what NCCL is given
        handed.append(t)

    monkeypatch.setattr(collectives, "_world", lambda: 2)
    monkeypatch.setattr(collectives.dist, "all_reduce", all_reduce)
    with FakeGPU(gpu) as g:
        dt = policy_dtype(g)
        g.to_cuda(model, dt)
        # the loader's batch: CPU tensors (uint8 images), as the data pipeline hands them over
        cpu = torch.device("cpu")
        b = Batch(g.fake(u8, cpu), g.fake(tokens, cpu), g.fake(lens, cpu), list(range(6)))
        g.int_read = tokens.shape[1]  # int(lens.max()) of a slice: the batch's width
        mb = to_micro(b, 0, 0, 3, g.device, dt)
        # uint8 pixels (the model normalises them in its dtype) or images in the engine's dtype
        assert mb.images.device == g.device and mb.images.dtype in (torch.uint8, dt)
        assert mb.tokens.device == mb.lens.device == g.device
        engine = StandInEngine(model, g)
        runner = StepRunner(engine, grad_accum=2, device=g.device, dtype=dt)
        logs = runner.run(b, p=0.5, generator=torch.Generator().manual_seed(0), capture=True,
                          step=1)  # fmt: skip
    assert engine.steps == 2 and len(engine.grads) == 2
    check_grads(model, engine.grads[0], dt)
    check_clean(g)
    assert handed, "no collective ran"
    assert all(t.device == g.device for t in handed), [t.device for t in handed]
    # the vote reads one flag per micro-batch from the GPU; the logged terms come back in one
    # transfer per micro-batch (plus the means' one): never one synchronisation per term
    votes = [r for r in g.host_reads if "collectives.py:all_finite" in r[1]]
    assert len(votes) == 2 and all(kind.startswith("cuda") for kind, _ in votes), votes
    assert set(logs) >= {"loss", "ce", "clip", "aux", "lr", "fault/skipped"}
    return g


# ---------------------------------------------------------------------- decoding
@pytest.mark.parametrize(
    "strategy,moe",
    [("greedy", False), ("beam", False), ("sample", False), ("greedy", True), ("beam", True)],
)
def test_decoding(strategy, moe):
    run_decoding(strategy, moe)


def run_decoding(strategy: str, moe: bool) -> FakeGPU:
    from fastcap import generate as G

    model = make_model(moe).eval()
    images, _, _ = batch(B=3)
    T = MAX_LEN - 1
    kw = {"num_beams": 3} if strategy == "beam" else {}
    if strategy == "sample":
        kw = {"top_p": 0.9, "num_return_sequences": 2}  # seed=None: a CUDA Generator needs
        # the driver (fake_cuda's docstring); the global generator draws instead
    with FakeGPU("a100", int_read=T) as g:
        g.to_cuda(model, policy_dtype(g))
        gen = G.generate(model, g.fake(images), strategy=strategy, **kw)
    rows = 3 * (2 if strategy == "sample" else 1)
    assert gen.tokens.shape == (rows, T) and gen.tokens.dtype == torch.long
    assert gen.lens.shape == gen.scores.shape == (rows,)
    assert fake_devices(gen) == {"cuda:0"}
    assert gen.scores.dtype == torch.float32
    check_clean(g)
    # host synchronisations: a look for finished rows every FINISH_CHECK_EVERY steps and the
    # final length, plus (MoE reference only) none; never one per step
    looks = -(-T // G.DEFAULT_FINISH_CHECK_EVERY)
    assert len(g.host_reads) <= looks + 1, g.host_reads
    assert all(w.startswith("fastcap/generate.py") for _, w in g.host_reads), g.host_reads
    return g


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_static_decoding(strategy):
    from fastcap import generate as G

    model = make_model().eval()
    images, _, _ = batch(B=2)
    T = MAX_LEN - 1
    kw = {"num_beams": 2} if strategy == "beam" else {}
    with FakeGPU("h100", int_read=T) as g, g.cuda_graphs():
        g.to_cuda(model, policy_dtype(g))
        gen = G.generate(model, g.fake(images), strategy=strategy, static=True, **kw)
    assert fake_devices(gen) == {"cuda:0"}
    assert len(g.captures) == 1, "the step was not captured as a CUDA graph"
    cap = g.captures[0]
    assert not cap["host_reads"], f"host reads inside the CUDA-graph capture: {cap}"
    assert not cap["cpu_made"], f"CPU tensors inside the CUDA-graph capture: {cap}"
    assert g.replays == T - 1  # step 0 eager, step 1 captured, then every step replayed
    check_clean(g)


# ---------------------------------------------------------------------- SCST
def test_scst():
    from fastcap.train.scst import SelfCritical

    model = make_model()
    images, tokens, lens = batch(B=2)
    seen = []

    def reward(ids, gen, per_image):  # CiderReward's contract: rewards on the rows' device
        seen.append(gen.tokens.device)
        return torch.zeros(len(ids) * per_image, device=gen.tokens.device)

    with FakeGPU("a100", int_read=MAX_LEN - 1) as g:
        dt = policy_dtype(g)
        g.to_cuda(model, dt)
        obj = SelfCritical(reward, ids=[0, 1], samples=3, max_new_tokens=6, fixed_length=True)
        out = model(g.fake(images, dtype=dt), g.fake(tokens), g.fake(lens), objective=obj)
        assert out["loss"].device == g.device and out["loss"].dtype == torch.float32
        assert fake_devices(out) == {"cuda:0"}
        grads = g.backward(out["loss"])
    assert seen == [g.device]
    # the trunk and encoder get a gradient through the teacher-forced pass's image tokens
    assert model.decoder.embed.weight in grads
    for p, gr in grads.items():
        assert gr.device == p.device and gr.dtype == dt
    check_clean(g)


# ---------------------------------------------------------------------- fastcap.load, server
def write_run(out, model) -> None:
    """A run folder of an untrained model (weights do not matter to a fake run)."""
    from fastcap.data.tokenizer import CaptionTokenizer
    from fastcap.train.config import DataConfig, TrainConfig, to_dict

    out.mkdir(parents=True, exist_ok=True)
    caps = ["a red circle", "a blue square left of a green triangle", "two small shapes"] * 4
    tok = CaptionTokenizer.train(caps, vocab_size=V)
    model.cfg.vocab_size = tok.vocab_size
    cfg = TrainConfig(model=model.cfg, data=DataConfig(data="shapes:none"), out=str(out))
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    tok.save(out / "tokenizer.json")
    torch.save({"model": model.state_dict(), "model_config": to_dict(cfg)["model"]},
               out / "model.pt")  # fmt: skip


@pytest.mark.parametrize("gpu", ["a100", "t4"])
def test_load_and_caption(gpu, tmp_path):
    import fastcap
    from fastcap.api import DecodeOptions
    from fastcap.cli.caption import parser as caption_parser
    from fastcap.data.tokenizer import CaptionTokenizer
    from fastcap.runs import load_run
    from fastcap.serve.app import Limits, _prepare

    caps = ["a red circle", "a blue square left of a green triangle", "two small shapes"] * 4
    vocab = CaptionTokenizer.train(caps, vocab_size=V).vocab_size
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.vocab_size = vocab
    write_run(tmp_path / "run", Captioner(cfg))
    pics = [torch.randint(0, 256, (40, 52, 3), dtype=torch.uint8).numpy() for _ in range(3)]
    png = io.BytesIO()
    Image.fromarray(pics[0]).save(png, format="PNG")
    blobs = [("a.png", png.getvalue()), ("images[1]", png.getvalue())]
    with FakeGPU(gpu, int_read=MAX_LEN - 1) as g:
        cap = fastcap.load(tmp_path / "run", device="cuda")
        # fastcap-caption and fastcap-eval: --dtype left out is the policy's too
        args = caption_parser().parse_args([str(tmp_path / "run"), "x.jpg"])
        cli_model, _, _ = load_run(args.run_dir, "cuda", args.dtype)
        assert next(cli_model.parameters()).dtype == policy_dtype(g)
        del cli_model
        g.cpu_made.clear()  # the model is built on the CPU, then moved: as load_run does
        assert cap.device == g.device and cap.dtype == policy_dtype(g)
        assert all(p.device == g.device for p in cap.model.parameters())
        assert cap.batch_size == min(256, 2 * g.info.total_memory // 2**30)
        one = cap.caption(pics[0])
        many = cap.caption(pics, strategy="beam", num_beams=2)
        # the server's batch call: uploads read by _prepare, one caption_prepared per batch
        served = []
        for opts in (DecodeOptions(strategy="greedy"), DecodeOptions(strategy="sample", seed=3)):
            with g.host():  # the server decodes uploads on the CPU, before the batch
                items = _prepare(cap, blobs, False, Limits(), threading.Semaphore(1), opts)
            served += cap.caption_prepared(items, opts)
    assert isinstance(one.text, str) and len(many) == 3 and len(served) == 4
    # CPU tensors only where the host prepares images or reads results back
    host = ("fastcap/api.py", "fastcap/data/images.py", "fastcap/generate.py:length_penalty")
    assert all(site(w).startswith(host) for w in g.cpu_made), dict(g.cpu_made)
    g.cpu_made.clear()
    check_clean(g)


# ---------------------------------------------------------------------- planted faults
def _fault_decoder_cpu_mask(monkeypatch):
    """The decoder's padding mask built on the CPU (torch.arange without a device)."""
    from fastcap.model import decoder

    real = torch.arange
    monkeypatch.setattr(decoder.torch, "arange", lambda *a, **k: real(*a, **{**k, "device": "cpu"}))


def _fault_images_fp32(monkeypatch):
    """fp32 pixels into a bf16 trunk (the first GPU path's bug): every convolution is fed its
    input in fp32."""
    real = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: real(self, x.float()))


def _fault_norm_fp32(monkeypatch):
    """RMSNorm hands its fp32 arithmetic on without casting back to the model's dtype."""
    from fastcap.model import layers

    def forward(self, x):
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    monkeypatch.setattr(layers.RMSNorm, "forward", forward)


def _fault_kv_cache_cpu(monkeypatch):
    """The KV cache allocates its buffers on the CPU."""
    from fastcap.model import layers

    real = layers.KVCache.append

    def append(self, k, v):
        if self.k is None:
            R, H, L, D = k.shape
            self._bufs = (torch.empty(R, H, self.capacity, D, dtype=k.dtype),) * 2
            self.k, self.v = self._bufs
        return real(self, k, v)

    monkeypatch.setattr(layers.KVCache, "append", append)


def _fault_collective_cpu(monkeypatch):
    """The logged means handed to the collective as CPU tensors."""
    from fastcap.train import collectives

    real = collectives.mean_over_ranks
    monkeypatch.setattr(collectives, "mean_over_ranks", lambda v, d: real(v, torch.device("cpu")))
    from fastcap.train import step

    monkeypatch.setattr(step, "mean_over_ranks", collectives.mean_over_ranks)


def _fault_moe_dtype(monkeypatch):
    """The routed experts' output comes back in fp32 in a bf16 model."""
    from fastcap.model import moe

    real = moe.moe_ffn
    monkeypatch.setattr(moe, "moe_ffn", lambda *a: real(*a).float())


def _fault_grad_cpu(monkeypatch):
    """A custom op's backward returns a gradient on the CPU (the LCE's d weight)."""
    import fastcap.kernels.lce as lce

    real = lce._lce_backward

    def backward(ctx, *grads):
        out = list(real(ctx, *grads))
        out[1] = out[1].cpu() if out[1] is not None else None
        return tuple(out)

    monkeypatch.setattr(lce, "_lce_backward", backward)
    lce._lce_fwd_op.register_autograd(backward, setup_context=lce._lce_setup)


FAULTS = {
    "decoder-cpu-mask": (_fault_decoder_cpu_mask, "captioner"),
    "images-fp32": (_fault_images_fp32, "step"),
    "kv-cache-cpu": (_fault_kv_cache_cpu, "decode"),
    "norm-fp32": (_fault_norm_fp32, "captioner"),
    "collective-cpu": (_fault_collective_cpu, "step"),
    "moe-dtype": (_fault_moe_dtype, "moe"),
    "grad-cpu": (_fault_grad_cpu, "captioner"),
}


RUNS = {
    "captioner": lambda mp: run_captioner("a100", False),
    "moe": lambda mp: run_captioner("a100", True),
    "step": lambda mp: run_train_step("a100", mp),
    "decode": lambda mp: run_decoding("greedy", False),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_planted_fault(fault, monkeypatch):
    """Each fault, planted, makes the run that covers its code fail with a device or dtype
    error (the same run passes unplanted: the cases above)."""
    plant, case = FAULTS[fault]
    plant(monkeypatch)
    try:
        with pytest.raises(Exception) as err:  # noqa: B017 - the message is checked below
            RUNS[case](monkeypatch)
    finally:
        if fault == "grad-cpu":  # the registration is global: put the real backward back
            import fastcap.kernels.lce as lce

            monkeypatch.undo()
            lce._lce_fwd_op.register_autograd(lce._lce_backward, setup_context=lce._lce_setup)
    msg = f"{type(err.value).__name__}: {err.value}"
    words = ("cpu", "cuda", "device", "dtype", "float", "bfloat")
    assert any(w in msg.lower() for w in words), msg
