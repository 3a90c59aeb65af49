"""Decoding: the KV cache against a full recompute, beam search against greedy and against
exhaustive enumeration, nucleus sampling, the logits processors, the decoding machinery (the
preallocated cache, deferred looks for finished rows, static decoding, grouped
cross-attention), retrieval recall, and captions that never hold broken UTF-8."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastcap.generate as generate_mod
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.generate import (
    apply_repetition_penalty,
    ban_repeated_ngrams,
    beam,
    check_controls,
    decode_texts,
    generate,
    greedy,
    length_penalty_factor,
    sample,
    top_k_top_p_filter,
)
from fastcap.model import Captioner, ModelConfig
from fastcap.model.config import MoEConfig
from fastcap.model.layers import Attention, KVCache
from fastcap.ops.ref.rope import apply_rope, rope_range
from fastcap.train.evaluate import retrieval_recall

PAD, BOS, EOS = 0, 1, 2
# (dtype, atol, rtol) of model logits: cached decoding vs a full recompute
TOL = {torch.float32: (2e-5, 1e-5)}


def tiny_model(vocab: int, seed: int, max_len: int = 16, eos_boost: float = 0.0) -> Captioner:
    """A random 1+1+1-layer captioner. ``eos_boost`` scales the (tied) eos embedding so that
    some images end early and others do not: the mix the cache tests need."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        image_size=32,
        width=64,
        heads=4,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=1,
        vocab_size=vocab,
        max_len=max_len,
        embed_dim=32,
    )
    m = Captioner(cfg).eval()
    if eos_boost:
        with torch.no_grad():
            m.decoder.embed.weight[EOS] *= eos_boost
    return m


def images(B: int, seed: int) -> torch.Tensor:
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def full_logits(model, x: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (N, T, V) of generated ``tokens`` (N, T), no cache: position i
    holds the distribution that chose tokens[:, i]."""
    img_tokens, _ = model.encode_image(x)
    kv = model.image_kv(img_tokens)
    inputs = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)
    h, _, _ = model.decode(inputs, lens, kv)
    return model.logits(h)


def banned_logp(logits: torch.Tensor) -> torch.Tensor:
    """The decoders' log-probs with no controls set: pad and bos banned after log_softmax."""
    logp = logits.float().log_softmax(-1)
    logp[..., [PAD, BOS]] = float("-inf")
    return logp


def seq_logp(model, x, tokens, lens) -> torch.Tensor:
    """(N,) summed log-probs of each generated sequence up to its length, full recompute."""
    logp = banned_logp(full_logits(model, x, tokens, lens))
    tok_lp = logp.gather(2, tokens[:, :, None]).squeeze(2)
    live = torch.arange(tokens.shape[1])[None, :] < lens[:, None]
    return torch.where(live, tok_lp, 0.0).sum(1)


def mixed_batch(strategy: str, B: int = 7):
    """Draw model + images until the batch has rows that end at different steps and a row
    that runs to max_new_tokens (deterministic seeds, fresh draws).

    A random captioner barely looks at the image, so greedy decodes every image alike (all end
    together or none does); sampling gives the mix. Greedy shares the decoding loop, so its
    batch only needs different images.
    """
    for seed in range(50):
        m = tiny_model(vocab=11, seed=seed)
        x = images(B, seed + 100)
        if strategy == "greedy":
            return m, x, greedy(m, x, max_new_tokens=9, output_logits=True)
        g = sample(m, x, max_new_tokens=9, output_logits=True, seed=seed, top_p=1.0)
        if bool((g.lens == 9).any()) and g.lens.unique().numel() > 2:
            return m, x, g
    raise AssertionError("no seed gave a batch with both finished and unfinished rows")


# ---------------------------------------------------------------------- the KV cache
@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_cache_logits_equal_full_recompute_every_step(strategy):
    m, x, g = mixed_batch(strategy)
    ref = full_logits(m, x, g.tokens, g.lens)
    atol, rtol = TOL[torch.float32]
    for b in range(x.shape[0]):
        n = int(g.lens[b])
        torch.testing.assert_close(g.step_logits[b, :n], ref[b, :n], atol=atol, rtol=rtol)
        # finished rows left the batch: no logits were computed for them after eos
        assert torch.isnan(g.step_logits[b, n:]).all()
        assert (g.tokens[b, n:] == PAD).all()
        assert n == g.tokens.shape[1] or g.tokens[b, n - 1] == EOS
    # the decoded tokens are the ones the recomputed distribution picks (greedy) and the
    # scores are the recomputed log-probs
    if strategy == "greedy":
        live = torch.arange(g.tokens.shape[1])[None, :] < g.lens[:, None]
        pick = banned_logp(ref).argmax(-1)
        assert torch.equal(pick[live], g.tokens[live])
    torch.testing.assert_close(g.scores, seq_logp(m, x, g.tokens, g.lens), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_no_cache_baseline_gives_the_same_tokens(strategy):
    m = tiny_model(vocab=23, seed=3, eos_boost=2.0)
    x = images(5, 4)
    fn = {"greedy": greedy, "beam": beam, "sample": sample}[strategy]
    kw = {"beam": {"num_beams": 3}, "sample": {"seed": 7}}.get(strategy, {})
    a = fn(m, x, max_new_tokens=8, **kw)
    b = fn(m, x, max_new_tokens=8, use_cache=False, **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lens, b.lens)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------- beam search
@pytest.mark.parametrize("B", [1, 6])
def test_beam_one_is_greedy(B):
    m = tiny_model(vocab=31, seed=B, eos_boost=2.5)
    x = images(B, B + 1)
    g = greedy(m, x, max_new_tokens=12)
    for alpha in (0.0, 0.6):
        b = beam(m, x, num_beams=1, length_penalty=alpha, max_new_tokens=12)
        assert torch.equal(b.tokens, g.tokens) and torch.equal(b.lens, g.lens)
        torch.testing.assert_close(b.scores * length_penalty_factor(b.lens, alpha), g.scores)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_matches_exhaustive_enumeration(alpha):
    """6-token vocabulary (pad, bos, eos + 3 words), length 4: every caption the decoder may
    write is scored by a full recompute; enough beams must return the best ones."""
    T, R = 4, 3
    m = tiny_model(vocab=6, seed=int(alpha * 10) + 5, eos_boost=2.0)
    x = images(3, 9)
    words = [3, 4, 5]
    seqs = []  # every sequence: words then eos, or T words
    for n in range(T):
        seqs += [list(p) + [EOS] for p in itertools.product(words, repeat=n)]
    seqs += [list(p) for p in itertools.product(words, repeat=T)]
    toks = torch.full((len(seqs), T), PAD)
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = torch.tensor(s)
    lens = torch.tensor([len(s) for s in seqs])
    got = beam(
        m,
        x,
        num_beams=64,
        length_penalty=alpha,
        early_stopping=False,
        max_new_tokens=T,
        num_return_sequences=R,
    )
    for b in range(x.shape[0]):
        xb = x[b : b + 1].expand(len(seqs), -1, -1, -1)
        pen = seq_logp(m, xb, toks, lens) / length_penalty_factor(lens, alpha)
        best = pen.topk(R).indices
        for r in range(R):
            i = best[r]
            row = b * R + r
            assert int(got.lens[row]) == int(lens[i])
            assert torch.equal(got.tokens[row, : lens[i]], toks[i, : lens[i]])
            torch.testing.assert_close(got.scores[row], pen[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_scores_are_length_penalised_logprobs(early_stopping):
    m = tiny_model(vocab=37, seed=11, eos_boost=2.5)
    B, K, R, alpha = 5, 4, 3, 0.6
    x = images(B, 12)
    got = beam(
        m,
        x,
        num_beams=K,
        num_return_sequences=R,
        length_penalty=alpha,
        early_stopping=early_stopping,
        max_new_tokens=10,
    )
    assert got.tokens.shape[0] == B * R
    xr = x.repeat_interleave(R, 0)
    want = seq_logp(m, xr, got.tokens, got.lens) / length_penalty_factor(got.lens, alpha)
    torch.testing.assert_close(got.scores, want, atol=1e-5, rtol=1e-5)
    # best first within each image, and the best is no worse than greedy
    s = got.scores.view(B, R)
    assert (s[:, :-1] >= s[:, 1:]).all()
    g = greedy(m, x, max_new_tokens=10)
    assert (s[:, 0] >= g.scores / length_penalty_factor(g.lens, alpha) - 1e-5).all()


# ---------------------------------------------------------------------- sampling
def test_sample_seeded_runs_agree():
    m = tiny_model(vocab=29, seed=2, eos_boost=1.5)
    x = images(6, 3)
    a = sample(m, x, top_p=0.8, top_k=10, temperature=1.3, seed=123, max_new_tokens=10)
    b = sample(m, x, top_p=0.8, top_k=10, temperature=1.3, seed=123, max_new_tokens=10)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)
    gen = torch.Generator().manual_seed(123)
    c = sample(m, x, top_p=0.8, top_k=10, temperature=1.3, generator=gen, max_new_tokens=10)
    assert torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("top_p,top_k", [(0.3, 0), (0.75, 0), (0.9, 4), (1.0, 3)])
def test_filter_never_samples_outside_nucleus(top_p, top_k):
    V, R = 17, 5
    logits = torch.randn(R, V) * 2
    lp = logits.log_softmax(-1)
    allowed = torch.zeros(R, V, dtype=torch.bool)
    for r in range(R):
        order = lp[r].argsort(descending=True).tolist()
        if top_k:
            order = order[:top_k]
        p = lp[r, order].softmax(-1) if top_k else lp[r, order].exp()
        mass = 0.0
        for tok, pt in zip(order, p.tolist()):
            allowed[r, tok] = True
            mass += pt
            if mass >= top_p:
                break
    filt = top_k_top_p_filter(lp, top_k, top_p)
    assert torch.equal(torch.isfinite(filt), allowed)
    draws = torch.multinomial(filt.softmax(-1), 4000, replacement=True)  # (R, 4000)
    assert allowed.gather(1, draws).all()
    seen = torch.zeros(R, V, dtype=torch.bool).scatter_(1, draws, True)
    assert torch.equal(seen, allowed)  # and the nucleus is not trimmed further


def test_sampled_tokens_lie_in_each_step_nucleus():
    m = tiny_model(vocab=19, seed=8, eos_boost=1.5)
    x = images(16, 5)
    for seed in range(3):
        g = sample(m, x, top_p=0.6, seed=seed, max_new_tokens=8, output_logits=True)
        lp = banned_logp(g.step_logits)  # (B, T, V); NaN rows are past the end
        T = g.tokens.shape[1]
        for b in range(x.shape[0]):
            for t in range(int(g.lens[b])):
                keep = torch.isfinite(top_k_top_p_filter(lp[b, t : t + 1], 0, 0.6))[0]
                assert keep[g.tokens[b, t]], (b, t)
        assert T <= 8


def test_low_temperature_sampling_is_greedy():
    m = tiny_model(vocab=31, seed=4, eos_boost=2.5)
    x = images(7, 6)
    g = greedy(m, x, max_new_tokens=12)
    s = sample(m, x, top_p=1.0, temperature=1e-4, seed=0, max_new_tokens=12)
    assert torch.equal(s.tokens, g.tokens)


def test_num_return_sequences_sample_is_image_major():
    m = tiny_model(vocab=31, seed=4)
    x = images(3, 6)
    s = sample(m, x, top_p=1.0, temperature=1e-4, num_return_sequences=2, max_new_tokens=6)
    assert torch.equal(s.tokens[0::2], s.tokens[1::2])  # each image's two (greedy) draws


# ---------------------------------------------------------------------- processors
def test_repetition_penalty_on_constructed_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -4.0], [2.0, -1.0, 0.5, 3.0, -4.0]])
    hist = torch.tensor([[0, 1, 1], [3, 4, 3]])  # repeats are penalised once
    out = apply_repetition_penalty(logits.clone(), hist, 2.0)
    want = torch.tensor([[1.0, -2.0, 0.5, 3.0, -4.0], [2.0, -1.0, 0.5, 1.5, -8.0]])
    assert torch.equal(out, want)
    assert torch.equal(apply_repetition_penalty(logits.clone(), hist, 1.0), logits)


def test_no_repeat_ngram_on_constructed_logits():
    inf = float("-inf")
    hist = torch.tensor([[1, 5, 6, 7, 5, 6], [1, 3, 3, 4, 5, 6]])
    lp = torch.zeros(2, 9)
    out3 = ban_repeated_ngrams(lp.clone(), hist, 3)
    assert out3[0].tolist() == [0, 0, 0, 0, 0, 0, 0, inf, 0]  # (5, 6, 7) seen: 7 banned
    assert torch.isfinite(out3[1]).all()  # (5, 6) appears once: nothing to ban
    out2 = ban_repeated_ngrams(lp.clone(), hist, 2)
    assert out2[0].tolist() == [0, 0, 0, 0, 0, 0, 0, inf, 0]  # after 6 came 7
    assert torch.isfinite(out2[1]).all()
    out1 = ban_repeated_ngrams(lp.clone(), hist, 1)
    assert torch.isinf(out1[0, [1, 5, 6, 7]]).all() and torch.isfinite(out1[0, [2, 3, 4, 8]]).all()
    hist_rep = torch.tensor([[1, 3, 3]])  # prefix (3) was followed by 3: banned
    assert torch.isinf(ban_repeated_ngrams(torch.zeros(1, 5), hist_rep, 2)[0, 3])
    assert torch.isfinite(ban_repeated_ngrams(torch.zeros(1, 5), hist_rep, 4)).all()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_decoded_captions_never_repeat_ngrams(n):
    m = tiny_model(vocab=23, seed=1)  # a random model repeats tokens a lot
    x = images(6, 2)
    for g in (
        greedy(m, x, max_new_tokens=14, no_repeat_ngram_size=n),
        beam(m, x, num_beams=3, max_new_tokens=14, no_repeat_ngram_size=n),
    ):
        for row, ln in zip(g.tokens.tolist(), g.lens.tolist()):
            seq = [BOS] + row[:ln]
            grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
            assert len(grams) == len(set(grams)), seq


def test_repetition_penalty_reduces_repeats():
    m = tiny_model(vocab=23, seed=1)
    x = images(6, 2)
    plain = greedy(m, x, max_new_tokens=14)
    pen = greedy(m, x, max_new_tokens=14, repetition_penalty=5.0)

    def repeats(g):
        return sum(len(r[:n]) - len(set(r[:n])) for r, n in zip(g.tokens.tolist(), g.lens.tolist()))

    assert repeats(pen) < repeats(plain)


def test_min_new_tokens():
    m = tiny_model(vocab=11, seed=0, eos_boost=5.0)
    x = images(8, 1)
    assert (greedy(m, x, max_new_tokens=10).lens == 1).all()  # the model likes to stop at once
    for g in (
        greedy(m, x, max_new_tokens=10, min_new_tokens=3),
        beam(m, x, num_beams=3, max_new_tokens=10, min_new_tokens=3),
        sample(m, x, seed=0, max_new_tokens=10, min_new_tokens=3),
    ):
        assert (g.lens >= 4).all()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"strategy": "nucleus"}, "unknown strategy"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_beams": 0}, "num_beams"),
        ({"temperature": 0.0}, "temperature"),
        ({"strategy": "beam", "num_beams": 2, "num_return_sequences": 3}, "num_return"),
        ({"max_new_tokens": 3, "min_new_tokens": 4}, "min_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_bad_controls_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        check_controls(**kw)


def test_decodes_in_the_model_dtype():
    m = tiny_model(vocab=31, seed=4).to(torch.bfloat16)
    x = images(3, 6)
    g = greedy(m, x, max_new_tokens=6)
    b = beam(m, x, num_beams=2, max_new_tokens=6)
    assert g.tokens.shape[0] == 3 and b.tokens.shape[0] == 3
    assert torch.isfinite(g.scores).all() and torch.isfinite(b.scores).all()


# ---------------------------------------------------------------------- the decoding machinery
def ragged(strategy: str, **kw):
    """Model, images and the default decoding of a batch whose rows (greedy) or images (beam)
    end at different steps, at least one running to max_new_tokens=12 (deterministic search;
    a random captioner barely looks at the image, so the images are scaled up)."""
    fn = {"greedy": greedy, "beam": beam}[strategy]
    if strategy == "beam":
        kw = {"num_beams": 3, **kw}
    for boost, seed in itertools.product((2.5, 3.0, 2.0), range(12)):
        m = tiny_model(vocab=23, seed=seed, eos_boost=boost)
        x = images(8, seed + 50) * 3
        g = fn(m, x, max_new_tokens=12, **kw)
        if bool((g.lens == 12).any()) and bool((g.lens < 12).any()):
            return m, x, fn, kw, g
    raise AssertionError("no seed gave rows that end at different steps")


def same_decoding(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lens, b.lens)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("every", [2, 5])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_looking_for_finished_rows_every_k_steps_keeps_the_result(monkeypatch, strategy, every):
    """Between looks (each a host read; every step on a CPU, every 8 on a GPU) finished rows
    stay in the batch, masked: the tokens, lengths and scores must not change."""
    m, x, fn, kw, want = ragged(strategy)
    monkeypatch.setattr(generate_mod, "FINISH_CHECK_EVERY", {"cpu": every})
    same_decoding(fn(m, x, max_new_tokens=12, **kw), want)


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_the_step_loop_reads_the_host_only_at_looks(monkeypatch, strategy, every):
    """No .item() / bool() / int() / .tolist() of a tensor inside a step: only one look every
    ``every`` steps, plus the final length."""
    m, x, fn, kw, _ = ragged(strategy)
    monkeypatch.setattr(generate_mod, "FINISH_CHECK_EVERY", {"cpu": every})
    reads = []
    for name in ("__bool__", "__int__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda t, *a, _r=real, _n=name: (reads.append(_n), _r(t, *a))[1]
        )
    T = 12
    fn(m, x, max_new_tokens=T, **kw)
    assert 1 <= len(reads) <= (T - 1) // every + 1, reads


@pytest.mark.parametrize(
    "strategy,kw",
    [
        ("greedy", {}),
        ("greedy", {"min_new_tokens": 2}),
        ("beam", {}),
        ("beam", {"early_stopping": False, "num_return_sequences": 2}),
        ("beam", {"length_penalty": 0.0, "min_new_tokens": 3}),
    ],
)
def test_static_decoding_gives_the_same_captions(strategy, kw):
    """static=True (full-length cache with a length mask, position on the device, finished
    rows masked: the CUDA-graph form) against the default decoding."""
    m, x, fn, kw, want = ragged(strategy, **kw)
    same_decoding(fn(m, x, max_new_tokens=12, static=True, **kw), want)


@pytest.mark.parametrize(
    "kw", [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"output_logits": True}]
)
def test_static_decoding_rejects_history_processors(kw):
    m = tiny_model(vocab=11, seed=0)
    with pytest.raises(ValueError, match="static=True"):
        greedy(m, images(2, 0), max_new_tokens=4, static=True, **kw)


def test_static_decoding_rejects_moe():
    torch.manual_seed(0)
    cfg = ModelConfig(
        image_size=32, width=64, heads=4, encoder_layers=1, unimodal_layers=1,
        multimodal_layers=1, vocab_size=11, max_len=8, embed_dim=32,
        moe=MoEConfig(enabled=True, num_experts=4, top_k=2, expert_hidden=16, first_dense=False),
    )  # fmt: skip
    m = Captioner(cfg).eval()
    with pytest.raises(ValueError, match="MoE"):
        greedy(m, images(2, 0), max_new_tokens=4, static=True)
    greedy(m, images(2, 0), max_new_tokens=4)  # the dynamic cache decodes MoE


@pytest.mark.parametrize("static", [False, True])
def test_kv_cache_is_preallocated_and_written_in_place(static):
    """Feeding T tokens one at a time leaves in the cache exactly the keys (rotated) and values
    of the whole sequence, in buffers allocated once."""
    m = tiny_model(vocab=23, seed=5)
    B, T = 3, 7
    tokens = torch.randint(3, 23, (B, T), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        kv = m.image_kv(m.encode_image(images(B, 5))[0])
        cache = m.decoder.new_cache(T, "cpu", static=static)
        ptrs = set()
        for t in range(T):
            h, _, _ = m.decode(tokens[:, t : t + 1], None, kv, cache)
            ptrs |= {c.k.data_ptr() for c in cache} | {c.v.data_ptr() for c in cache}
            if static:
                cache[0].pos += 1
        assert len(ptrs) == 2 * len(cache)  # never reallocated
        full, _, _ = m.decode(tokens, torch.full((B,), T), kv)
        torch.testing.assert_close(h[:, 0], full[:, -1], atol=2e-5, rtol=1e-5)
        layer = m.decoder.layers[0]
        k, v = layer.self_attn.project_kv(layer.norm1(m.decoder.embed(tokens)))
        cos, sin = rope_range(0, T, k.shape[-1], layer.rope_theta, "cpu")
        torch.testing.assert_close(cache[0].k[:, :, :T], apply_rope(k, cos, sin), atol=1e-6, rtol=0)
        torch.testing.assert_close(cache[0].v[:, :, :T], v, atol=1e-6, rtol=0)
        if not static:  # static: the position is the caller's (on the device)
            with pytest.raises(ValueError, match="KVCache"):
                m.decode(tokens[:, :1], None, kv, cache)  # full
        with pytest.raises(ValueError, match="KVCache"):
            m.decode(tokens[:2, :1], None, kv, cache)  # rows that are not the cache's
        with pytest.raises(ValueError, match="kv_lens"):
            m.decode(tokens[:, :1], torch.full((B,), 1), kv, m.decoder.new_cache(T, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Dh", [8, 24])
def test_cache_rotation_is_bit_identical_to_apply_rope(dtype, Dh):
    x = torch.randn(3, 5, 2, Dh).to(dtype)
    for start in (0, 7, 29):
        cache = KVCache(31, "cpu")
        cache.len = start
        cos, sin = rope_range(start, start + 2, Dh, 500.0, "cpu")
        assert torch.equal(cache.rotate(x, 500.0), apply_rope(x, cos, sin))
        static = KVCache(31, "cpu", pos=torch.tensor([start]))
        one = x[:, :, :1]
        assert torch.equal(static.rotate(one, 500.0), apply_rope(one, cos[:1], sin[:1]))


@pytest.mark.parametrize("static", [False, True])
def test_cache_select_rows_reorders_in_place(static):
    cache = KVCache(6, "cpu", pos=torch.tensor([0]) if static else None)
    for _ in range(3):
        k = torch.randn(5, 2, 1, 4)
        cache.append(k, -k)
        if static:
            cache.pos += 1
    before = cache.k[:, :, :3].clone()
    ptrs = set()
    for idx in (torch.tensor([4, 4, 0, 2, 1]), torch.tensor([1, 0, 3, 2, 4])):
        cache.select_rows(idx)
        before = before[idx]
        assert torch.equal(cache.k[:, :, :3], before) and torch.equal(cache.v[:, :, :3], -before)
        ptrs.add(cache.k.data_ptr())
    assert len(ptrs) == (1 if static else 2)  # static: the same memory; else two swapping
    if not static:
        cache.select_rows(torch.tensor([3, 1]))  # rows that leave
        assert cache.k.shape[0] == 2 and torch.equal(cache.k[:, :, :3], before[[3, 1]])


@pytest.mark.parametrize("L", [1, 3])
def test_grouped_cross_attention_equals_repeated_keys(L):
    """Beam search keeps one row of image keys per image: attending with it must equal
    attending with the keys repeated once per beam (the training forward's layout)."""
    torch.manual_seed(0)
    attn = Attention(32, 4, cross=True)
    Bk, g, N = 3, 5, 7
    x = torch.randn(Bk * g, L, 32)
    k, v = attn.project_kv(torch.randn(Bk, N, 32))
    rep = (k.repeat_interleave(g, 0), v.repeat_interleave(g, 0))
    with torch.no_grad():
        want = attn(x, kv=rep)
        torch.testing.assert_close(attn(x, kv=(k, v)), want, atol=1e-6, rtol=1e-5)
        cache = KVCache(4, "cpu")
        torch.testing.assert_close(
            attn.decode_cross(x, (k, v), cache.attend), want, atol=1e-6, rtol=1e-5
        )
    with pytest.raises(ValueError, match="group"):
        attn(x[:4], kv=(k, v))


# ---------------------------------------------------------------------- retrieval
def test_retrieval_recall_on_constructed_embeddings():
    img = torch.eye(4)  # image i points along axis i
    owner = torch.tensor([0, 0, 1, 2, 3])
    txt = torch.stack([img[0], img[1] * 0.9 + img[0] * 0.1, img[1], img[3], img[2]])
    txt = torch.nn.functional.normalize(txt, dim=-1)
    r = retrieval_recall(img, txt, owner, ks=(1, 5))
    # images 0, 1 find their own text first; 2 and 3 find each other's
    assert r["i2t_R@1"] == pytest.approx(0.5) and r["i2t_R@5"] == 1.0
    # texts 0, 2 find their image; text 1 finds image 1 (not its owner 0); 3, 4 swapped
    assert r["t2i_R@1"] == pytest.approx(0.4) and r["t2i_R@5"] == 1.0


def test_precomputed_image_tokens_give_the_same_captions():
    m = tiny_model(vocab=23, seed=3)
    x = images(4, 8)
    with torch.no_grad():
        tok = m.encode_image(x)[0]
    for fn, kw in ((greedy, {}), (beam, {"num_beams": 2}), (sample, {"seed": 1})):
        a, b = (
            fn(m, x, max_new_tokens=6, **kw),
            fn(m, None, image_tokens=tok, max_new_tokens=6, **kw),
        )
        assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="image_tokens"):
        greedy(m, None)


# ---------------------------------------------------------------------- text
@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_captions_never_hold_replacement_characters(monkeypatch, strategy):
    """A captioner that prefers the bytes of non-ASCII characters emits ids that are not valid
    UTF-8 (as an early COCO run did); the texts made from them (``decode_texts``, what the
    evaluation and fastcap-caption use) hold no U+FFFD."""
    words = ["a", "red", "blue", "circle", "square", "left", "of", "the"]
    tok = CaptionTokenizer.train([" ".join(words[i:] + words[:i]) for i in range(8)], 300)
    m = tiny_model(vocab=tok.vocab_size, seed=0)
    # the corpus is ASCII, so each byte of these characters is a token of its own
    high = sorted(set(tok.encode("éü🦓中ñ")[1:]))
    bias = torch.zeros(tok.vocab_size)
    bias[high] = 6.0 + torch.rand(len(high))
    plain = m.logits
    monkeypatch.setattr(m, "logits", lambda h: plain(h) + bias)
    kw = {"beam": {"num_beams": 3, "num_return_sequences": 2}, "sample": {"seed": 0}}
    gen = generate(m, images(6, 1), strategy=strategy, max_new_tokens=7, **kw.get(strategy, {}))
    texts = decode_texts(tok, gen)
    assert not any("\ufffd" in t for t in texts), texts
    # the ids were broken: the library's own byte-level decoder would have replaced bytes
    lossy = [tok._tok.decode(row[: int(n)].tolist()) for row, n in zip(gen.tokens, gen.lens)]
    assert any("\ufffd" in t for t in lossy), lossy
