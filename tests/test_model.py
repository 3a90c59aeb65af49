"""The captioner: padding cannot leak, teacher forcing does what it says, MoE balance loss,
and switching kernels changes neither the state_dict nor the loss."""

from __future__ import annotations

import os

import pytest
import torch

from fastcap.model import Captioner, ModelConfig, MoEConfig, lm_targets, mix_inputs
from fastcap.model.moe import MoE

V = 40


def tiny_cfg(**kw) -> ModelConfig:
    base = {
        "image_size": 32,
        "trunk_stride": 8,
        "width": 64,
        "heads": 4,
        "encoder_layers": 1,
        "unimodal_layers": 1,
        "multimodal_layers": 1,
        "vocab_size": V,
        "max_len": 16,
        "embed_dim": 32,
    }
    base.update(kw)
    return ModelConfig(**base)


def make_batch(B=5, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g)
    lens = torch.randint(3, L + 1, (B,), generator=g)
    lens[0] = L
    tokens = torch.randint(3, V, (B, L), generator=g)
    tokens[:, 0] = 1
    tokens[torch.arange(B), lens - 1] = 2
    pos = torch.arange(L)[None, :]
    tokens = tokens.masked_fill(pos >= lens[:, None], 0)
    return images, tokens, lens


@pytest.mark.parametrize("moe", [False, True])
def test_padding_cannot_leak(moe):
    """Garbage after each caption's end changes neither the losses nor real-position logits."""
    torch.manual_seed(0)
    m = Captioner(
        tiny_cfg(moe=MoEConfig(enabled=moe, num_experts=4, top_k=2, expert_hidden=32))
    ).eval()
    images, tokens, lens = make_batch()
    garbage = tokens.clone()
    pos = torch.arange(tokens.shape[1])[None, :]
    pad = pos >= lens[:, None]
    garbage[pad] = torch.randint(3, V, (int(pad.sum()),))
    longer = torch.cat([garbage, torch.randint(3, V, (tokens.shape[0], 5))], dim=1)
    with torch.no_grad():
        a = m(images, tokens, lens)
        b = m(images, garbage, lens)
        c = m(images, longer, lens)
        img_tokens, _ = m.encode_image(images)
        kv = m.image_kv(img_tokens)
        ha, _, _ = m.decode(tokens, lens, kv)
        hc, _, _ = m.decode(longer, lens, kv)
    for k in ("loss", "ce", "clip", "aux"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[k], c[k], rtol=1e-5, atol=1e-6)
    real = ~pad
    torch.testing.assert_close(
        m.logits(ha)[real], m.logits(hc[:, : tokens.shape[1]])[real], rtol=1e-5, atol=1e-5
    )


def test_lm_targets_shift_and_ignore():
    tokens = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    lens = torch.tensor([4, 3])
    want = torch.tensor([[5, 6, 2, -100, -100], [7, 2, -100, -100, -100]])
    assert torch.equal(lm_targets(tokens, lens), want)


def test_teacher_forcing_p1_equals_plain():
    torch.manual_seed(0)
    m = Captioner(tiny_cfg())
    images, tokens, lens = make_batch()
    m.eval()
    with torch.no_grad():
        plain = m(images, tokens, lens, tf_p=1.0)
    # p = 1: mix_inputs reads gold everywhere
    pred = torch.randint(3, V, tokens.shape)
    mixed, used = mix_inputs(tokens, pred, lens, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(mixed, tokens) and not used.any()
    # and the full two-pass forward (taken for any p < 1) at p just below 1 reads no
    # prediction, so it equals plain teacher forcing exactly
    p = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0)).item()
    with torch.no_grad():
        two_pass = m(images, tokens, lens, tf_p=p, generator=torch.Generator().manual_seed(1))
    assert float(two_pass["tf_pred"]) == 0.0
    for k in ("loss", "ce", "clip"):
        assert torch.equal(plain[k], two_pass[k]), k


def test_teacher_forcing_reads_predictions_at_expected_rate():
    B, L = 400, 20
    gold = torch.full((B, L), 7)
    pred = torch.full((B, L), 9)
    lens = torch.randint(4, L + 1, (B,))
    for p in (0.0, 0.25, 0.75):
        mixed, used = mix_inputs(gold, pred, lens, p, torch.Generator().manual_seed(0))
        pos = torch.arange(L)[None, :]
        eligible = (pos >= 1) & (pos < lens[:, None] - 1)
        assert not used[~eligible].any()  # bos, eos, padding stay gold
        assert torch.equal(mixed[used], pred[used]) and torch.equal(mixed[~used], gold[~used])
        rate = used.sum().item() / eligible.sum().item()
        n = eligible.sum().item()
        assert abs(rate - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5) + 1e-9, (p, rate)


def test_two_pass_forward_reports_share_and_differs():
    torch.manual_seed(0)
    m = Captioner(tiny_cfg())
    images, tokens, lens = make_batch(B=8)
    out = m(images, tokens, lens, tf_p=0.5, generator=torch.Generator().manual_seed(0))
    assert 0.2 < float(out["tf_pred"]) < 0.8
    out["loss"].backward()  # the second pass is differentiable
    assert m.decoder.embed.weight.grad is not None


def test_moe_balance_loss_uniform_is_alpha():
    cfg = MoEConfig(enabled=True, num_experts=4, top_k=2, expert_hidden=8, aux_alpha=1.0)
    moe = MoE(16, cfg)
    with torch.no_grad():
        moe.router.zero_()  # all scores equal: P_i = 1/E; ties broken -> counts may skew
    x = torch.randn(64, 16)
    _, aux = moe(x)
    # f_i sums to E and P_i = 1/E exactly, so sum f_i P_i = 1 for any routing
    torch.testing.assert_close(aux, torch.tensor(1.0))
    assert moe.last_load.sum().item() == pytest.approx(1.0)


def test_moe_block_uses_moe_ffn_and_routes_real_tokens_only(monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_cfg(
        moe=MoEConfig(enabled=True, num_experts=4, top_k=2, expert_hidden=16, first_dense=False)
    )
    m = Captioner(cfg)
    seen = []
    import fastcap.model.moe as moe_mod

    real = moe_mod.moe_ffn

    def spy(x, *a):
        seen.append(x.shape[0])
        return real(x, *a)

    monkeypatch.setattr(moe_mod, "moe_ffn", spy)
    images, tokens, lens = make_batch()
    m(images, tokens, lens)
    assert seen == [int(lens.sum())] * 2  # two MoE layers, only real tokens routed


# The ops with a Triton kernel. They run on a GPU, or on the CPU under the
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
TRITON_OPS = ("attention", "moe", "siglip", "lce")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter"
)
@pytest.mark.parametrize(
    "triton_ops", [(op,) for op in TRITON_OPS] + [TRITON_OPS], ids=lambda t: "+".join(t)
)
def test_kernel_switch_keeps_state_dict_loss_and_grads(monkeypatch, triton_ops):
    """The same weights under FASTCAP_KERNELS=ref and ``ref,<op>=triton`` for ``triton_ops``:
    the same state_dict keys, and the loss and every gradient agree to fp32 rounding; the Triton
    kernels really ran."""
    from fastcap.ops import dispatch

    cfg = tiny_cfg(moe=MoEConfig(enabled=True, num_experts=4, top_k=2, expert_hidden=16))
    images, tokens, lens = (t.to(DEVICE) for t in make_batch(B=3, L=7))
    picked = set()
    resolve = dispatch.resolve

    def spy(op, device):
        impl = resolve(op, device)
        picked.add((op, impl))
        return impl

    monkeypatch.setattr(dispatch, "resolve", spy)
    runs = []
    # the others stay ref on any device (auto would pick kernels for CUDA tensors)
    for kernels in ("ref", ",".join(["ref", *(f"{op}=triton" for op in triton_ops)])):
        monkeypatch.setenv("FASTCAP_KERNELS", kernels)
        torch.manual_seed(0)
        m = Captioner(cfg).to(DEVICE)
        loss = m(images, tokens, lens)["loss"]
        loss.backward()
        runs.append(
            (list(m.state_dict()), loss.detach(), {n: p.grad for n, p in m.named_parameters()})
        )
    (keys, want, want_g), (got_keys, got, got_g) = runs
    assert got_keys == keys
    assert {(op, "triton") for op in triton_ops} <= picked
    assert not {(op, "triton") for op in TRITON_OPS if op not in triton_ops} & picked
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n, g in want_g.items():
        torch.testing.assert_close(got_g[n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_diagnostics_are_finite():
    torch.manual_seed(0)
    m = Captioner(tiny_cfg(moe=MoEConfig(enabled=True, num_experts=4, top_k=2, expert_hidden=16)))
    images, tokens, lens = make_batch()
    out = m(images, tokens, lens, tf_p=0.5, capture=True)
    diag = {k: v for k, v in out.items() if k.startswith("diag/")}
    assert any("cross" in k for k in diag) and any("enc" in k for k in diag)
    assert any("router_entropy" in k for k in diag)
    for k, v in diag.items():
        assert torch.isfinite(torch.as_tensor(v)).all(), k
        if "entropy" in k:
            assert 0.0 <= float(v) <= 1.0 + 1e-5, k


def test_patching_and_group_norm_shapes():
    m = Captioner(tiny_cfg(image_size=64, patch=2, trunk_norm="group"))
    tok, emb = m.encode_image(torch.randn(2, 3, 64, 64))
    assert tok.shape == (2, 16, 64) and emb.shape == (2, 32)
    with pytest.raises(ValueError, match="divisible by patch"):
        tiny_cfg(image_size=64, patch=3).validate()


def test_rope_tables_cached_during_decoding_still_train():
    """A RoPE table first built under inference_mode must not poison a later training step."""
    from fastcap.generate import greedy

    torch.manual_seed(0)
    m = Captioner(tiny_cfg(max_len=40))
    images, tokens, lens = make_batch(L=37)
    greedy(m.eval(), images[:2], max_new_tokens=37)  # builds tables inside inference_mode
    m.train()
    m(images, tokens, lens)["loss"].backward()


def test_activation_checkpointing_same_loss_and_grads():
    from fastcap.train.parallelize import apply_activation_checkpointing

    images, tokens, lens = make_batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = Captioner(
            tiny_cfg(moe=MoEConfig(enabled=True, num_experts=4, top_k=2, expert_hidden=16))
        )
        if ckpt:
            assert apply_activation_checkpointing(m) == 3  # 1 encoder + 2 decoder layers
        out = m(images, tokens, lens, tf_p=0.5, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads.append((out["loss"].detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
