"""The Triton kernels as torch.library custom ops (``fastcap::*``), so torch.compile traces them.

1. ``torch.library.opcheck`` on every registered op (schema, autograd registration, the fake
   implementation against the real one, AOT dispatch with dynamic shapes) at small awkward
   shapes: fp32 and fp16; bf16 only on a GPU (the Triton interpreter's bf16 is broken).
2. The public kernel functions, now backed by the ops, against the references: outputs and
   every gradient at one awkward shape each (tests/test_attention.py etc. go deeper).
3. ``torch.compile(..., fullgraph=True)`` of a tiny captioner's training loss, forward and
   backward, with ``FASTCAP_KERNELS=triton``: no graph break (fullgraph raises on any), the
   fastcap ops in the forward and backward graphs, loss and gradients equal to eager ``ref``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")
from fastcap.kernels import attention as KA  # noqa: E402
from fastcap.kernels import lce as KL  # noqa: E402
from fastcap.kernels import moe as KM  # noqa: E402
from fastcap.kernels import siglip as KS  # noqa: E402
from fastcap.ops.ref import attention as RA  # noqa: E402
from fastcap.ops.ref import lce as RL  # noqa: E402
from fastcap.ops.ref import moe as RM  # noqa: E402
from fastcap.ops.ref import siglip as RS  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter"
)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(
        torch.bfloat16,
        id="bf16",
        marks=pytest.mark.skipif(not CUDA, reason="bf16 is broken in the Triton interpreter"),
    ),
]
# Every op this project registers, by name; the backward ops are called only from backward.
OPS = {
    "attention_fwd": KA._attention_fwd_op,
    "attention_bwd": KA._attention_bwd_op,
    "moe_ffn_fwd": KM._moe_fwd_op,
    "moe_ffn_bwd": KM._moe_bwd_op,
    "siglip_fwd": KS._siglip_fwd_op,
    "siglip_bwd": KS._siglip_bwd_op,
    "lce_fwd": KL._lce_fwd_op,
}
# the fastcap ops a training step's forward and backward graphs call (lce needs no backward op)
FWD_OPS = {"attention_fwd", "siglip_fwd", "lce_fwd"}
BWD_OPS = {"attention_bwd", "siglip_bwd"}


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _unit(*shape, dtype, seed):
    return torch.nn.functional.normalize(_randn(*shape, seed=seed), dim=-1).to(dtype)


def _grad(*xs):
    return tuple(x.detach().clone().requires_grad_(True) for x in xs)


# ----------------------------------------------------------------------------- inputs per op
# Each builder returns the op's positional arguments. Shapes are small and awkward: lengths and
# widths that are no multiple of 16, a length ratio with empty query rows, an expert that gets
# no token, a text offset, ignored targets.


def _attention_args(case: str, dtype):
    if case == "rope-lens":  # causal, RoPE, padding keys, one row of all padding
        B, H, Lq, Lk, D = 2, 2, 19, 23, 12
        lens = torch.tensor([23, 0], device=DEVICE)
        opts = (lens, True, 100.0, None)
    else:  # "long-q": Lq > Lk under causal leaves the first rows empty; odd D, a given scale
        B, H, Lq, Lk, D = 1, 3, 21, 9, 7
        opts = (None, True, None, 0.3)
    q, k, v = _randn(B, H, Lq, D, dtype=dtype), _randn(B, H, Lk, D, dtype=dtype, seed=1), None
    v = _randn(B, H, Lk, D, dtype=dtype, seed=2)
    return q, k, v, opts


def _moe_args(case: str, dtype):
    if case == "uneven":
        T, d, E, f, k = 13, 20, 4, 12, 2
    else:  # "idle-expert": expert 4 gets no token, widths 9 and 6
        T, d, E, f, k = 7, 9, 5, 6, 3
    x = _randn(T, d, dtype=dtype)
    w13 = _randn(E, d, 2 * f, dtype=dtype, seed=1, scale=d**-0.5)
    w2 = _randn(E, f, d, dtype=dtype, seed=2, scale=f**-0.5)
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(min(E, 4), generator=g)[:k] for _ in range(T)])
    tw = torch.rand(T, k, generator=g).to(DEVICE)
    return x, w13, w2, ids.to(DEVICE), tw


def _siglip_args(case: str, dtype):
    if case == "rect":  # 5 images against 11 texts, positives from text 3, width 20 (padded)
        M, N, d, offset, denom = 5, 11, 20, 3, 7.0
    else:  # "square": the single-process loss, width 32
        M, N, d, offset, denom = 9, 9, 32, 0, 9.0
    img, txt = _unit(M, d, dtype=dtype, seed=0), _unit(N, d, dtype=dtype, seed=1)
    scale = torch.tensor(math.log(10.0), device=DEVICE)
    bias = torch.tensor(-2.0, device=DEVICE)
    return img, txt, scale, bias, offset, denom


def _lce_args(case: str, dtype):
    if case == "smooth":  # label smoothing, ignored rows, 3 chunks of 4 rows
        N, V, d, eps, chunk = 11, 37, 20, 0.1, 4
    else:  # "plain": one chunk
        N, V, d, eps, chunk = 6, 50, 8, 0.0, None
    h, w = _randn(N, d, dtype=dtype), _randn(V, d, dtype=dtype, seed=1, scale=0.5)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    t[1] = -100
    return h, w, t, -100, eps, chunk


def _opcheck_cases(dtype):
    """(id, op, args) for every op: the forward ops with inputs that require grad (so the
    autograd registration and the AOT backward are checked too), the backward ops fed with
    their forward op's real outputs."""
    cases = []
    for case in ("rope-lens", "long-q"):
        q, k, v, opts = _attention_args(case, dtype)
        cases.append((f"attention_fwd-{case}", OPS["attention_fwd"], (*_grad(q, k, v), *opts)))
        out, lse = OPS["attention_fwd"](q, k, v, *opts)
        do = torch.randn_like(out)
        cases.append(
            (f"attention_bwd-{case}", OPS["attention_bwd"], (do, q, k, v, out, lse, *opts))
        )
    for case in ("uneven", "idle-expert"):
        x, w13, w2, ids, tw = _moe_args(case, dtype)
        for save in (True, False):
            args = (*_grad(x, w13, w2), ids, *_grad(tw), "torch", save)
            cases.append((f"moe_ffn_fwd-{case}-save{save:d}", OPS["moe_ffn_fwd"], args))
        out, *aux = OPS["moe_ffn_fwd"](x, w13, w2, ids, tw, "torch", True)
        dout = torch.randn_like(out)
        for needs in ((True,) * 4, (False, True, False, True)):
            args = (dout, x, w13, w2, ids, tw, *aux, *needs)
            tag = "".join(str(int(n)) for n in needs)
            cases.append((f"moe_ffn_bwd-{case}-{tag}", OPS["moe_ffn_bwd"], args))
    for case in ("rect", "square"):
        img, txt, scale, bias, offset, denom = _siglip_args(case, dtype)
        args = (*_grad(img, txt, scale, bias), offset, denom)
        cases.append((f"siglip_fwd-{case}", OPS["siglip_fwd"], args))
        grad = torch.tensor(0.7, device=DEVICE)
        for rows, cols in ((True, True), (False, True), (True, False)):
            args = (grad, img, txt, scale, bias, offset, denom, rows, cols)
            cases.append((f"siglip_bwd-{case}-{rows:d}{cols:d}", OPS["siglip_bwd"], args))
    for case in ("smooth", "plain"):
        h, w, t, ignore, eps, chunk = _lce_args(case, dtype)
        for need_h, need_w in ((True, True), (False, True), (False, False)):
            hh, ww = (x.detach().clone().requires_grad_(n) for x, n in ((h, need_h), (w, need_w)))
            args = (hh, ww, t, ignore, eps, need_h, need_w, chunk)
            cases.append((f"lce_fwd-{case}-{need_h:d}{need_w:d}", OPS["lce_fwd"], args))
    return cases


# ----------------------------------------------------------------------------- 1. opcheck


# The schemas (ints are inferred as SymInt). Optional tensors and floats are ``?``; the
# Python-side state of the old autograd Functions (alignment, save, offset, denom, chunk) is
# arguments. Each op returns fresh tensors and mutates nothing.
SCHEMAS = {
    "attention_fwd": "(Tensor q, Tensor k, Tensor v, Tensor? kv_lens, bool causal, "
    "float? rope_theta, float? scale) -> (Tensor, Tensor)",
    "attention_bwd": "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? kv_lens, bool causal, float? rope_theta, float? scale) -> (Tensor, Tensor, Tensor)",
    "moe_ffn_fwd": "(Tensor x, Tensor w13, Tensor w2, Tensor topk_ids, Tensor topk_weights, "
    "str align_impl, bool save) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "moe_ffn_bwd": "(Tensor dout, Tensor x, Tensor w13, Tensor w2, Tensor topk_ids, "
    "Tensor topk_weights, Tensor sorted_ids, Tensor expert_ids, Tensor a, Tensor h, "
    "bool need_x, bool need_w13, bool need_w2, bool need_tw) -> (Tensor, Tensor, Tensor, Tensor)",
    "siglip_fwd": "(Tensor img, Tensor txt, Tensor logit_scale, Tensor logit_bias, "
    "SymInt offset, float denom) -> Tensor",
    "siglip_bwd": "(Tensor grad, Tensor img, Tensor txt, Tensor logit_scale, Tensor logit_bias, "
    "SymInt offset, float denom, bool rows, bool cols) -> (Tensor, Tensor, Tensor, Tensor)",
    "lce_fwd": "(Tensor h, Tensor weight, Tensor targets, SymInt ignore_index, "
    "float label_smoothing, bool need_h, bool need_weight, SymInt? chunk_size) "
    "-> (Tensor, Tensor, Tensor)",
}


def test_every_op_is_registered():
    """The ops exist under ``torch.ops.fastcap`` with these schemas."""
    assert OPS.keys() == SCHEMAS.keys()
    for name, op in OPS.items():
        overload = getattr(torch.ops.fastcap, name).default
        assert overload is op._opoverload, name
        assert str(overload._schema) == f"fastcap::{name}{SCHEMAS[name]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op_name", list(OPS))
def test_opcheck(op_name, dtype):
    """opcheck with its default test utils on every case of this op."""
    cases = [c for c in _opcheck_cases(dtype) if c[0].startswith(op_name + "-")]
    assert len(cases) >= 2
    for case_id, op, args in cases:
        try:
            torch.library.opcheck(op, args)
        except Exception as e:
            raise AssertionError(f"opcheck failed for {case_id}: {e}") from e


def test_fake_outputs_match_real_shapes():
    """The fake implementations, run under FakeTensorMode, give every output the real one's
    shape, dtype and strides (opcheck checks this too; this names the output that differs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for case_id, op, args in _opcheck_cases(torch.float32):
        real = op(*args)
        real = real if isinstance(real, tuple) else (real,)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fargs)
        fake = fake if isinstance(fake, tuple) else (fake,)
        assert len(fake) == len(real), case_id
        for i, (f, r) in enumerate(zip(fake, real)):
            got = (tuple(f.shape), f.dtype, tuple(f.stride()) if f.numel() > 1 else None)
            want = (tuple(r.shape), r.dtype, tuple(r.stride()) if r.numel() > 1 else None)
            assert got == want, f"{case_id} output {i}"


# ----------------------------------------------------------------------------- 2. vs references


def _compare(fn, ref, inputs, rtol=1e-4, atol=1e-5):
    """fn and ref on copies of ``inputs`` (floats require grad): outputs and every gradient;
    and fn under no_grad gives the same output."""
    mine = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    theirs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out, want = fn(*mine), ref(*theirs)
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a.requires_grad:
            assert a.grad is not None, f"input {i} has no gradient"
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=f"input {i}")
    with torch.no_grad():
        torch.testing.assert_close(fn(*inputs), out.detach(), rtol=0, atol=0)


def test_attention_matches_ref():
    q, k, v, (lens, causal, theta, scale) = _attention_args("rope-lens", torch.float32)
    opts = {"causal": causal, "kv_lens": lens, "rope_theta": theta, "scale": scale}
    _compare(
        lambda q, k, v: KA.attention(q, k, v, **opts),
        lambda q, k, v: RA.attention(q, k, v, **opts),
        [q, k, v],
    )


def test_moe_ffn_matches_ref():
    x, w13, w2, ids, tw = _moe_args("idle-expert", torch.float32)
    f = lambda x, w13, w2, tw: KM.moe_ffn(x, w13, w2, ids, tw)
    _compare(f, lambda x, w13, w2, tw: RM.moe_ffn(x, w13, w2, ids, tw), [x, w13, w2, tw])


def test_moe_ffn_empty_batch_has_zero_gradients():
    """T = 0 is handled inside the ops now (a branch in the wrapper would not trace)."""
    x, w13, w2, ids, tw = _moe_args("uneven", torch.float32)
    x, tw = _grad(x[:0], tw[:0])
    w13, w2 = _grad(w13, w2)
    out = KM.moe_ffn(x, w13, w2, ids[:0], tw)
    assert out.shape == (0, x.shape[1])
    (out.sum() + 0.0).backward()
    for t in (x, w13, w2, tw):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_siglip_matches_ref():
    img, txt, scale, bias, offset, denom = _siglip_args("rect", torch.float32)
    _compare(
        lambda *a: KS.siglip_loss_rect(*a, offset, denom),
        lambda *a: RS._siglip_loss_rect(*a, offset, denom),
        [img, txt, scale, bias],
    )
    img, txt, scale, bias, _, _ = _siglip_args("square", torch.float32)
    _compare(KS.siglip_loss, RS.siglip_loss, [img, txt, scale, bias])


def test_lce_matches_ref():
    h, w, t, ignore, eps, chunk = _lce_args("smooth", torch.float32)
    opts = {"ignore_index": ignore, "label_smoothing": eps}
    _compare(
        lambda h, w: KL.linear_cross_entropy(h, w, t, chunk_size=chunk, **opts),
        lambda h, w: RL.linear_cross_entropy(h, w, t, **opts),
        [h, w],
    )


# ----------------------------------------------------------------------------- 3. torch.compile


def _recording_backend(seen: dict[str, set[str]]):
    """aot_eager, recording the fastcap ops each of the forward and backward graphs calls."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def record(kind):
        def compiler(gm, _example_inputs):
            for node in gm.graph.nodes:
                target = getattr(node.target, "name", lambda: "")
                name = target() if callable(target) else ""
                if node.op == "call_function" and name.startswith("fastcap::"):
                    seen[kind].add(name.removeprefix("fastcap::").split(".")[0])
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))


def _tiny_cfg(moe: bool):
    from fastcap.model import ModelConfig, MoEConfig

    # as tests/test_model.py builds it; the contrastive loss is on (lambda_clip > 0)
    cfg = ModelConfig(
        image_size=32,
        trunk_stride=8,
        width=64,
        heads=4,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=1,
        vocab_size=40,
        max_len=16,
        embed_dim=32,
        moe=MoEConfig(enabled=moe, num_experts=4, top_k=2, expert_hidden=16),
    )
    assert cfg.lambda_clip > 0
    return cfg


def _batch(B=3, L=7, V=40):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 32, 32, generator=g)
    lens = torch.tensor([L, 4, 5][:B])
    tokens = torch.randint(3, V, (B, L), generator=g)
    tokens[:, 0] = 1
    tokens[torch.arange(B), lens - 1] = 2
    tokens = tokens.masked_fill(torch.arange(L)[None, :] >= lens[:, None], 0)
    return tuple(t.to(DEVICE) for t in (images, tokens, lens))


def _loss_and_grads(monkeypatch, cfg, kernels: str, backend=None):
    """The training loss and every parameter's gradient under FASTCAP_KERNELS=kernels,
    eager (backend None) or compiled with fullgraph=True."""
    from fastcap.model import Captioner

    monkeypatch.setenv("FASTCAP_KERNELS", kernels)
    torch.manual_seed(0)
    model = Captioner(cfg).to(DEVICE)
    step = lambda images, tokens, lens: model(images, tokens, lens)["loss"]
    if backend is not None:
        torch._dynamo.reset()
        step = torch.compile(step, fullgraph=True, backend=backend)
    loss = step(*_batch())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for n, g in want_grads.items():
        assert grads[n] is not None, n
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5, msg=n)


# The model routes real tokens only, x[valid]: a data-dependent size, which dynamo captures
# (instead of breaking the graph) only with this flag. Dense models do not need it.
DYNAMIC_OUTPUT = {"capture_dynamic_output_shape_ops": True}


def test_compiled_dense_captioner_fullgraph(monkeypatch):
    """attention, siglip and lce in one graph: loss and gradients equal eager ref."""
    cfg = _tiny_cfg(moe=False)
    want = _loss_and_grads(monkeypatch, cfg, "ref")
    seen = {"fw": set(), "bw": set()}
    got = _loss_and_grads(monkeypatch, cfg, "triton", _recording_backend(seen))
    _assert_same(got, want)
    assert seen == {"fw": FWD_OPS, "bw": BWD_OPS}


def test_compiled_moe_layer_fullgraph(monkeypatch):
    """The MoE block on routed real tokens, as the decoder calls it (x[valid], so the token
    count is a data-dependent size inside the graph) through ``fastcap.ops.moe_ffn``; its
    forward and backward ops in the graphs; output and gradients equal eager ref."""
    from fastcap import ops

    E, k, d, f = 4, 2, 24, 12
    h = _randn(3, 7, d)
    valid = (
        torch.arange(7, device=DEVICE)[None, :] < torch.tensor([7, 2, 5], device=DEVICE)[:, None]
    )
    params = (_randn(E, d, seed=1), _randn(E, d, 2 * f, seed=2, scale=0.2))
    params += (_randn(E, f, d, seed=3, scale=0.3),)

    def layer(h, valid, router, w13, w2):
        x = h[valid]  # (T, d), T data-dependent
        weights, ids = (x @ router.T).softmax(-1).topk(k, dim=-1)
        out = torch.zeros_like(h)
        out[valid] = ops.moe_ffn(x, w13, w2, ids, weights)
        return (out * out).sum()

    runs = []
    seen = {"fw": set(), "bw": set()}
    for kernels, fn in (("ref", layer), ("triton", None)):
        monkeypatch.setenv("FASTCAP_KERNELS", kernels)
        if fn is None:
            torch._dynamo.reset()
            fn = torch.compile(layer, fullgraph=True, backend=_recording_backend(seen))
        ins = _grad(h, *params)
        with torch._dynamo.config.patch(**DYNAMIC_OUTPUT):
            loss = fn(ins[0], valid, *ins[1:])
        loss.backward()
        runs.append((loss.detach(), {str(i): x.grad for i, x in enumerate(ins)}))
    _assert_same(runs[1], runs[0])
    assert seen == {"fw": {"moe_ffn_fwd"}, "bw": {"moe_ffn_bwd"}}


def test_compiled_moe_captioner_fullgraph(monkeypatch):
    """All four ops in one graph (fullgraph, the MoE block's routed token count a data-dependent
    size): loss and gradients equal eager ref."""
    cfg = _tiny_cfg(moe=True)
    want = _loss_and_grads(monkeypatch, cfg, "ref")
    seen = {"fw": set(), "bw": set()}
    with torch._dynamo.config.patch(**DYNAMIC_OUTPUT):
        got = _loss_and_grads(monkeypatch, cfg, "triton", _recording_backend(seen))
    _assert_same(got, want)
    assert seen == {"fw": FWD_OPS | {"moe_ffn_fwd"}, "bw": BWD_OPS | {"moe_ffn_bwd"}}


@pytest.mark.slow
def test_compiled_dense_captioner_inductor(monkeypatch):
    """The same with the default backend (inductor; on a CPU it compiles C++, minutes)."""
    cfg = _tiny_cfg(moe=False)
    want = _loss_and_grads(monkeypatch, cfg, "ref")
    _assert_same(_loss_and_grads(monkeypatch, cfg, "triton", "inductor"), want)
