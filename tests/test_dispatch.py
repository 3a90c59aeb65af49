"""FASTCAP_KERNELS parsing, validation, what auto picks and logs, the public ops' argument
checks, and each op's Triton kernel against its reference through the public op."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

import fastcap.ops as ops
from fastcap.common import capability
from fastcap.ops import dispatch

# The Triton kernels run on a GPU, or on the CPU under the interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_TRITON = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def test_parse_defaults_and_per_op():
    assert dispatch.parse(None) == dict.fromkeys(dispatch.OPS, "auto")
    assert dispatch.parse("ref") == dict.fromkeys(dispatch.OPS, "ref")
    got = dispatch.parse("attention=ref, moe=triton")
    assert got["attention"] == "ref" and got["moe"] == "triton" and got["siglip"] == "auto"
    got = dispatch.parse("ref,moe=triton")
    assert got["moe"] == "triton" and got["attention"] == "ref"


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("fast", "valid: auto, ref, triton, cuda"),
        ("attn=ref", "valid ops: attention, moe, siglip, lce"),
        ("moe=fast", "valid choices: auto, ref, triton, cuda"),
    ],
)
def test_unknown_names_raise_with_choices(spec, needle):
    with pytest.raises(ValueError, match=needle):
        dispatch.parse(spec)


def test_impossible_choices_raise(monkeypatch):
    q = torch.randn(1, 1, 2, 4)
    monkeypatch.setenv("FASTCAP_KERNELS", "attention=cuda")
    with pytest.raises(ValueError, match="valid choices for attention: auto, ref, triton"):
        ops.attention(q, q, q)
    monkeypatch.setenv("FASTCAP_KERNELS", "moe=cuda")
    x, w13, w2 = torch.randn(3, 4), torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    ids, w = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*valid choices for moe"):
        ops.moe_ffn(x, w13, w2, ids, w)
    monkeypatch.setenv("FASTCAP_KERNELS", "attention=triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.attention(q, q, q)


def test_auto_on_cpu_is_ref(monkeypatch):
    monkeypatch.setenv("FASTCAP_KERNELS", "auto")
    for op in dispatch.OPS:
        assert dispatch.resolve(op, torch.device("cpu")) == "ref"
        assert dispatch.get(op, torch.device("cpu")) is dispatch._load(dispatch.IMPLS[op]["ref"])


def test_auto_logs_its_choice_once(monkeypatch, caplog):
    """``auto`` on CUDA tensors names what it picked, and what it fell back from, once per
    (op, reason). A CUDA device object and torch's device queries patched to an A100
    (``capability.simulate``) test this without a GPU (the interpreter lets the Triton modules
    import); tests/test_capability.py covers the other GPUs."""
    monkeypatch.setenv("FASTCAP_KERNELS", "auto")
    monkeypatch.setattr(dispatch, "_logged", set())
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="fastcap.ops"), capability.simulate("a100"):
        assert [dispatch.resolve("attention", cuda) for _ in range(3)] == ["triton"] * 3
        # a Triton module that does not import: auto falls back and says why
        monkeypatch.setitem(dispatch.IMPLS["siglip"], "triton", "fastcap.kernels.absent:f")
        assert [dispatch.resolve("siglip", cuda) for _ in range(3)] == ["ref"] * 3
    msgs = [r.getMessage() for r in caplog.records if r.name == "fastcap.ops"]
    assert msgs[0] == (
        "fastcap.ops: attention -> triton (auto): NVIDIA A100-SXM4-80GB (sm_80): "
        "Triton's tl.dot runs on tensor cores from sm_80"
    ), msgs
    assert len(msgs) == 2 and "siglip falls back to ref (auto)" in msgs[1], msgs
    assert "fastcap.kernels.absent" in msgs[1], msgs


def test_explicit_choice_that_cannot_load_raises(monkeypatch):
    """Only auto falls back: an explicit choice whose module does not import raises, and a
    choice the op lacks names the op's valid choices."""
    q = torch.randn(1, 1, 2, 4)
    monkeypatch.setitem(dispatch.IMPLS["attention"], "triton", "fastcap.kernels.absent:f")
    monkeypatch.setenv("FASTCAP_KERNELS", "attention=triton")
    with pytest.raises(RuntimeError, match="not available here.*valid choices for attention"):
        ops.attention(q, q, q)
    monkeypatch.setenv("FASTCAP_KERNELS", "siglip=cuda")
    e = torch.randn(2, 3)
    with pytest.raises(ValueError, match="no 'cuda'.*valid choices for siglip: auto, ref, triton"):
        ops.siglip_loss(e, e, torch.tensor(0.0), torch.tensor(0.0))


def test_per_op_choice_leaves_the_others(monkeypatch):
    monkeypatch.setenv("FASTCAP_KERNELS", " moe = triton , ref ")  # order and spaces do not matter
    assert dispatch.current() == {**dict.fromkeys(dispatch.OPS, "ref"), "moe": "triton"}
    cpu = torch.device("cpu")
    assert dispatch.resolve("moe", cpu) == "triton" and dispatch.resolve("attention", cpu) == "ref"
    monkeypatch.setenv("FASTCAP_KERNELS", "")  # read again on every call
    assert dispatch.resolve("moe", cpu) == "ref"


def _attention_case():
    B, H, Lq, Lk, D = 2, 3, 5, 7, 16
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for L in (Lq, Lk, Lk))
    kw = {"causal": True, "kv_lens": torch.tensor([3, Lk], device=DEVICE), "rope_theta": 1e4}
    return (q, k, v), kw, lambda *a: ops.attention(*a, **kw)


def _moe_case():
    T, d, f, E, k = 13, 16, 8, 4, 2
    x, w13, w2 = torch.randn(T, d), torch.randn(E, d, 2 * f) / 4, torch.randn(E, f, d) / 4
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k).softmax(-1)
    x, w13, w2, ids, w = (t.to(DEVICE) for t in (x, w13, w2, ids, w))
    return (x, w13, w2, w), {}, lambda x, w13, w2, w: ops.moe_ffn(x, w13, w2, ids, w)


def _siglip_case():
    img, txt = (F.normalize(torch.randn(7, 16, device=DEVICE), dim=-1) for _ in range(2))
    scale, bias = torch.tensor(2.3, device=DEVICE), torch.tensor(-10.0, device=DEVICE)
    return (img, txt, scale, bias), {}, ops.siglip_loss


def _lce_case():
    N, d, V = 11, 16, 37
    h, w = torch.randn(N, d, device=DEVICE), torch.randn(V, d, device=DEVICE) / 4
    tgt = torch.randint(0, V, (N,), device=DEVICE)
    tgt[2] = -100
    kw = {"label_smoothing": 0.1}
    return (h, w), kw, lambda h, w: ops.linear_cross_entropy(h, w, tgt, **kw)


CASES = {
    "attention": _attention_case,
    "moe": _moe_case,
    "siglip": _siglip_case,
    "lce": _lce_case,
}


@pytest.mark.skipif(not RUNS_TRITON, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", list(CASES))
def test_triton_matches_ref_through_the_public_op(monkeypatch, op):
    """``<op>=triton`` runs the kernel (under TRITON_INTERPRET=1 without a GPU) and agrees with
    ``<op>=ref``: output and every gradient, fp32."""
    torch.manual_seed(0)
    inputs, _, fn = CASES[op]()
    loaded = []
    real_load = dispatch._load

    def spy(path):
        loaded.append(path)
        return real_load(path)

    monkeypatch.setattr(dispatch, "_load", spy)
    results = {}
    for impl in ("ref", "triton"):
        monkeypatch.setenv("FASTCAP_KERNELS", f"{op}={impl}")
        xs = [t.clone().requires_grad_() for t in inputs]
        out = fn(*xs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
        results[impl] = [out.detach(), *(x.grad for x in xs)]
        assert loaded[-1] == dispatch.IMPLS[op][impl]
    for name, got, want in zip(("out", *map(str, range(len(inputs)))), *results.values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{op} {name}")


def test_bad_shapes_name_the_shapes():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"\(1, 2, 5, 8\)"):
        ops.attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="dtypes differ"):
        ops.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="kv_lens"):
        ops.attention(q, q, q, kv_lens=torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"w2 \(2, 5, 4\)"):
        ops.moe_ffn(
            torch.randn(3, 4),
            torch.randn(2, 4, 6),
            torch.randn(2, 5, 4),
            torch.zeros(3, 1, dtype=torch.long),
            torch.ones(3, 1),
        )
    with pytest.raises(ValueError, match=r"\(4, 3\), \(5, 3\)"):
        ops.siglip_loss(torch.randn(4, 3), torch.randn(5, 3), torch.tensor(0.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="targets"):
        ops.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3))


@pytest.mark.parametrize("gpu,want", [("a100", "triton"), ("t4", "ref")])
def test_auto_on_a_gpu_traces_without_graph_break(gpu, want, monkeypatch):
    """The public ops call dispatch.get inside compiled code: the capability policy's device
    queries, the extension check and the log-once must not break a fullgraph compile (they
    reach dynamo as constants: ``torch.compiler.assume_constant_result``)."""
    monkeypatch.setenv("FASTCAP_KERNELS", "auto")
    cuda = torch.device("cuda")

    def f(x):
        return x * (2.0 if dispatch.resolve("attention", cuda) == "triton" else 3.0)

    with capability.simulate(gpu):
        dispatch.validate(dispatch.OPS, cuda)  # imports the modules, as the trainer does
        torch._dynamo.reset()
        got = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2))
    assert got.tolist() == [2.0 if want == "triton" else 3.0] * 2
