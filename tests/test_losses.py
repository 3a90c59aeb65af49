"""The captioner's loss terms: the contrastive text tower reads only the gold caption, and the
contrastive temperature is bounded."""

from __future__ import annotations

import math

import torch

from fastcap.model import Captioner, ModelConfig

V = 40


def tiny_model(seed: int = 0, **kw) -> Captioner:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        image_size=32,
        trunk_stride=8,
        width=64,
        heads=4,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=1,
        vocab_size=V,
        max_len=16,
        embed_dim=32,
        **kw,
    )
    return Captioner(cfg)


def batch(B=6, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g)
    lens = torch.randint(5, L + 1, (B,), generator=g)
    tokens = torch.randint(3, V, (B, L), generator=g)
    tokens[:, 0] = 1
    tokens[torch.arange(B), lens - 1] = 2
    tokens = tokens.masked_fill(torch.arange(L)[None, :] >= lens[:, None], 0)
    return images, tokens, lens


def test_contrastive_text_embedding_reads_the_gold_caption():
    """At tf_p = 0 every caption input is the model's own (image-conditioned) prediction; the
    contrastive term and its gradients must still be those of the gold caption, bit for bit."""
    m = tiny_model()
    images, tokens, lens = batch()

    gold = m(images, tokens, lens, tf_p=1.0)
    mixed = m(images, tokens, lens, tf_p=0.0, generator=torch.Generator().manual_seed(1))
    assert mixed["tf_pred"] > 0.5  # the second pass really read predictions
    assert torch.equal(mixed["clip"], gold["clip"])
    assert not torch.equal(mixed["ce"], gold["ce"])  # while the CE did see them


def test_contrastive_gradient_ignores_predicted_inputs():
    """The text tower's gradient from the contrastive loss is the gold-caption gradient."""
    m = tiny_model(lambda_clip=1.0)
    images, tokens, lens = batch(seed=3)
    grads = []
    for p in (1.0, 0.0):
        m.zero_grad()
        out = m(images, tokens, lens, tf_p=p, generator=torch.Generator().manual_seed(2))
        out["loss"].backward()
        # the text head is reached only through the contrastive term
        grads.append([m.decoder.text_embed.weight.grad.clone(), m.logit_bias.grad.clone()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_temperature_is_clamped_and_logits_stay_finite():
    m = tiny_model()
    images, tokens, lens = batch()
    with torch.no_grad():
        m.logit_scale.fill_(200.0)  # what an unbounded temperature reaches under a huge LR
    out = m(images, tokens, lens)
    assert math.isclose(float(out["logit_scale"]), math.log(100.0), rel_tol=1e-6)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["clip"])
    out["loss"].backward()
    assert float(m.logit_scale.grad.abs().sum()) == 0.0  # pinned at the bound


def test_huge_lr_on_the_temperature_keeps_the_loss_finite():
    m = tiny_model(lambda_clip=1.0)
    images, tokens, lens = batch(seed=5)
    temp = [m.logit_scale, m.logit_bias]
    rest = [p for p in m.parameters() if all(p is not t for t in temp)]
    opt = torch.optim.AdamW(
        [{"params": temp, "lr": 50.0, "weight_decay": 0.0}, {"params": rest, "lr": 1e-3}]
    )
    for _ in range(6):
        opt.zero_grad()
        out = m(images, tokens, lens)
        assert torch.isfinite(out["loss"]), out
        assert float(out["logit_scale"]) <= math.log(100.0) + 1e-6
        out["loss"].backward()
        opt.step()
        with torch.no_grad():  # push it past the bound, as momentum would
            m.logit_scale.add_(40.0)
