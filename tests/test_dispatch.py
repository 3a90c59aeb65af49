"""FASTCAP_KERNELS parsing, validation and the public ops' argument checks."""

from __future__ import annotations

import pytest
import torch

import fastcap.ops as ops
from fastcap.ops import dispatch


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


def test_ref_and_auto_agree_on_cpu(monkeypatch):
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    lens = torch.tensor([3, 6])
    outs = []
    for spec in ("ref", "auto"):
        monkeypatch.setenv("FASTCAP_KERNELS", spec)
        outs.append(ops.attention(q, k, v, causal=True, kv_lens=lens, rope_theta=1e4))
    assert torch.equal(outs[0], outs[1])


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
