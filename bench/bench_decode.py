"""Decoding throughput: greedy and beam-5 at batch 64, exactly 32 new tokens, on the
shapes-tiny model.

Two comparisons:

* the KV cache against the no-cache baseline that recomputes the whole prefix at every step
  (``use_cache=False``: ``model.decode`` on the full prefix);
* fastcap against its natural peer, Hugging Face ``generate`` on a GPT-2 decoder with
  cross-attention of the same width, heads, depth and vocabulary (``transformers`` is the
  ``bench`` extra, never a runtime dependency; the rows skip without it). On the CPU both run
  eagerly on one thread, interleaved (``conftest.interleaved_ratio``); on a GPU, in bf16,
  fastcap's ``static=True`` decoding (one step captured as a CUDA graph and replayed) against
  ``generate`` with ``cache_implementation="static"`` (which compiles its forward on CUDA).

Every row decodes exactly 32 tokens (``min_new_tokens = max_new_tokens``: eos is banned until
then, on both sides), so every variant does the same number of steps. The images are encoded
outside the timed call (``image_tokens``, the peer's ``encoder_hidden_states``): the encoder is
not what decoding speeds up. Both sides project the image tokens to cross-attention keys and
values inside the timed call (fastcap in ``image_kv``, the peer in its first step).
Reported: generated caption tokens per second (B * 32 per call; beam search's K beams count
once), the cache ``speedup`` over recompute, and the peer ratio with its spread.

    pytest bench/bench_decode.py --benchmark-only -q -s
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, interleaved_ratio, needs_gpu

from fastcap.generate import beam, greedy
from fastcap.model import Captioner
from fastcap.train.config import preset

B, T = 64, 32
STRATEGIES = {
    "greedy": lambda m, tok, c: greedy(
        m, None, image_tokens=tok, max_new_tokens=T, min_new_tokens=T, use_cache=c
    ),
    "beam5": lambda m, tok, c: beam(
        m, None, image_tokens=tok, num_beams=5, max_new_tokens=T, min_new_tokens=T, use_cache=c
    ),
}
# HF generate time / fastcap time on the CPU (median of interleaved pairs), asserted only where
# it was measured with margin (bench/RESULTS.md, 2026-12-01): beam-5 ran 2.19x and 2.35x;
# greedy 1.54x and 1.59x, with single pairs down to 1.24x: too close to 1.5 to gate, reported
PEER_GATE = {"greedy": None, "beam5": 1.5}
_medians: dict[tuple[str, bool], float] = {}


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """On the CPU, one intra-op thread: the small matmuls of decoding gain little from more,
    and on a shared machine extra threads only add scheduling noise (we saw 20x swings)."""
    if DEVICE != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shapes_tiny():
    mc = preset("shapes-tiny").model
    mc.vocab_size = 96  # the shapes-tiny tokenizer's size
    return mc


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Captioner(shapes_tiny()).to(DEVICE).eval()


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "recompute"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_decode(benchmark, measure, model, strategy, cache):
    size = model.cfg.image_size
    fn = STRATEGIES[strategy]

    def make_inputs():
        with torch.inference_mode():
            x = torch.randn(B, 3, size, size, device=DEVICE)
            return (model.encode_image(x)[0],)

    def run(tok):
        g = fn(model, tok, cache)
        assert g.tokens.shape == (B, T)

    # the recompute baseline is slow on a CPU: fewer rounds keep the file near 2 minutes
    rounds = 5 if DEVICE == "cuda" or cache else 2
    median = measure(
        run,
        make_inputs,
        group=f"decode-{strategy}-B{B}-T{T}",
        impl="kv-cache" if cache else "recompute",
        n_sets=2,
        rounds=rounds,
    )
    if median is None:
        return
    benchmark.extra_info["tokens_per_s"] = round(B * T / median, 1)
    _medians[(strategy, cache)] = median
    if not cache and (strategy, True) in _medians:
        speedup = median / _medians[(strategy, True)]
        benchmark.extra_info["speedup"] = round(speedup, 2)
        print(f"\n{strategy}: kv-cache {speedup:.2f}x faster than recompute at T={T}, B={B}")


# ---------------------------------------------------------------------- the peer: HF generate
def peer_model(mc, device, dtype):
    """GPT-2 with cross-attention in every layer, matched to fastcap's decoder: width, heads,
    depth (unimodal + multimodal layers) and vocabulary; random weights.

    What differs, all by design of the two models: GPT-2 has learned absolute positions and
    LayerNorm with biases, fastcap RoPE and RMSNorm; GPT-2's MLP is GELU with n_inner =
    1.5 x fastcap's SwiGLU width (the same weights and FLOPs per token: two d x 1.5f matrices
    against three d x f); GPT-2 cross-attends in all 3 layers, fastcap in its 2 multimodal ones
    (CoCa's unimodal layer reads no image); the LM heads are tied on both sides.
    """
    transformers = pytest.importorskip(
        "transformers", reason="the bench extra: pip install .[bench]"
    )
    cfg = transformers.GPT2Config(
        vocab_size=mc.vocab_size,
        n_positions=mc.max_len + T,
        n_embd=mc.width,
        n_head=mc.heads,
        n_layer=mc.unimodal_layers + mc.multimodal_layers,
        n_inner=3 * mc.ffn_hidden // 2,
        add_cross_attention=True,
        bos_token_id=mc.bos_id,
        eos_token_id=mc.eos_id,
        pad_token_id=mc.pad_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()


def peer_pair(model, hf, strategy: str, *, static: bool):
    """The two timed calls on the same image tokens: (HF generate, fastcap), each checking that
    it decoded exactly T tokens for every row."""
    mc = model.cfg
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    with torch.inference_mode():
        x = torch.randn(B, 3, mc.image_size, mc.image_size, device=dev, dtype=dtype)
        tok = model.encode_image(x)[0].contiguous()  # (B, N, d): the peer's encoder states
    bos = torch.full((B, 1), mc.bos_id, dtype=torch.long, device=dev)
    beams = 5 if strategy == "beam5" else 1
    hf_kw = {"num_beams": beams, "do_sample": False}
    if beams > 1:
        hf_kw["early_stopping"] = True  # as fastcap's default: stop at K finished hypotheses
    if static:
        hf_kw["cache_implementation"] = "static"

    def hf_generate():
        with torch.inference_mode():
            out = hf.generate(
                bos,
                encoder_hidden_states=tok,
                max_new_tokens=T,
                min_new_tokens=T,
                suppress_tokens=[mc.pad_id, mc.bos_id],  # fastcap bans them at every step
                **hf_kw,
            )
        assert out.shape == (B, T + 1)

    def fastcap_decode():
        kw = {"max_new_tokens": T, "min_new_tokens": T, "static": static}
        if beams > 1:
            g = beam(model, None, image_tokens=tok, num_beams=beams, **kw)
        else:
            g = greedy(model, None, image_tokens=tok, **kw)
        assert g.tokens.shape == (B, T) and bool((g.lens == T).all())

    return hf_generate, fastcap_decode


def report_peer(benchmark, r: dict, strategy: str, where: str) -> None:
    benchmark.extra_info["hf_generate_s"] = round(r["slow_s"], 5)
    benchmark.extra_info["fastcap_s"] = round(r["fast_s"], 5)
    benchmark.extra_info["hf_tokens_per_s"] = round(B * T / r["slow_s"], 1)
    benchmark.extra_info["fastcap_tokens_per_s"] = round(B * T / r["fast_s"], 1)
    benchmark.extra_info["hf_over_fastcap"] = round(r["median"], 3)
    spread = {k: round(r[k], 3) for k in ("min", "q1", "q3", "max")}
    benchmark.extra_info["hf_over_fastcap_spread"] = spread
    print(
        f"\n{strategy} {where}, B {B}, {T} tokens: HF generate {r['slow_s'] * 1e3:.1f} ms "
        f"({B * T / r['slow_s']:.0f} tokens/s), fastcap {r['fast_s'] * 1e3:.1f} ms "
        f"({B * T / r['fast_s']:.0f} tokens/s); fastcap {r['median']:.2f}x faster, median of "
        f"{r['pairs']} interleaved pairs (min {r['min']:.2f}, quartiles {r['q1']:.2f}-"
        f"{r['q3']:.2f}, max {r['max']:.2f})"
    )


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU row; on a GPU see test_vs_hf_generate_gpu")
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_vs_hf_generate(benchmark, measure, model, strategy):
    """fastcap against HF ``generate`` on the CPU: fp32, eager, one thread, interleaved pairs
    (each sample at least 0.1 s); gated by PEER_GATE where the margin was measured."""
    hf = peer_model(model.cfg, DEVICE, torch.float32)
    hf_generate, fastcap_decode = peer_pair(model, hf, strategy, static=False)
    if measure(fastcap_decode, lambda: (), group=f"decode-vs-hf-{strategy}-B{B}-T{T}",
               impl="fastcap", n_sets=1, rounds=3) is None:  # fmt: skip
        pytest.skip("benchmarks disabled: nothing timed")
    r = interleaved_ratio(hf_generate, fastcap_decode, (), pairs=11, threads=1)
    report_peer(benchmark, r, strategy, "cpu fp32, 1 thread")
    gate = PEER_GATE[strategy]
    if gate is not None:
        assert r["median"] >= gate, (
            f"fastcap {strategy} only {r['median']:.2f}x faster than HF generate (gate {gate}x)"
        )


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_vs_hf_generate_gpu(benchmark, measure, strategy):
    """The GPU form, bf16: fastcap ``static=True`` (a CUDA graph per call: one eager step, one
    capture, replays) against ``generate(cache_implementation="static")`` (HF compiles the
    forward for a static cache on CUDA; the first, compiling call is the warm-up). Reported,
    not gated: no GPU figure has been measured yet."""
    torch.manual_seed(0)
    model = Captioner(shapes_tiny()).to("cuda", torch.bfloat16).eval()
    hf = peer_model(model.cfg, "cuda", torch.bfloat16)
    hf_generate, fastcap_decode = peer_pair(model, hf, strategy, static=True)
    if measure(fastcap_decode, lambda: (), group=f"decode-vs-hf-gpu-{strategy}-B{B}-T{T}",
               impl="fastcap-static", n_sets=1, rounds=5) is None:  # fmt: skip
        pytest.skip("benchmarks disabled: nothing timed")
    r = interleaved_ratio(hf_generate, fastcap_decode, (), pairs=11)
    report_peer(benchmark, r, strategy, "cuda bf16, static")
