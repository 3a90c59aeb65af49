"""Decoding throughput: greedy and beam-5 with the KV cache against the no-cache baseline that
recomputes the whole prefix at every step (``use_cache=False``: ``model.decode`` on the full
prefix), batch 64, caption length 32, on the shapes-tiny model.

Every row decodes exactly 32 tokens (``min_new_tokens = max_new_tokens``: eos is banned), so
both variants do the same number of steps. The images are encoded outside the timed call
(``image_tokens``): the encoder is the same for both and is not what the cache speeds up.
Reported: generated caption tokens per second (B * 32 per call; beam search's K beams count
once) and, on the no-cache row, ``speedup`` = no-cache time / cache time of the same strategy.

    pytest bench/bench_decode.py --benchmark-only -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

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


@pytest.fixture(scope="module")
def model():
    mc = preset("shapes-tiny").model
    mc.vocab_size = 96  # the shapes-tiny tokenizer's size
    torch.manual_seed(0)
    return Captioner(mc).to(DEVICE).eval()


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
