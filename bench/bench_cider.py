"""CIDEr-D: ``fastcap.cider`` against pycocoevalcap's ``CiderScorer`` (the definition it matches).

    .venv/bin/python -m pytest bench/bench_cider.py --benchmark-only -q -s \
        --benchmark-columns=median,rounds --benchmark-group-by=group

CPU only (numpy and Python; nothing here touches torch). Two workloads:

(a) the SCST reward: B = 64 images x K = 5 sampled captions, 5 references per image, scored
    as a self-critical trainer does (``hyps`` of B*K, each image's reference list repeated for
    its K samples). pycocoevalcap's ``CiderScorer`` takes the (hyp, refs) pairs and recomputes
    the df from them, so it is compared with ours in per-call-df mode (the same numbers, checked
    here): the list repeated K times, or the B lists and a ``refs_index``, or raw text through the
    default ``simple_tokenize``. Corpus-df mode (df of 10,000 "training" images computed once, at
    construction, outside the timing) is reported against the same pycocoevalcap call: not the
    same numbers (another df), the same work.
(b) model selection: a 5,000-image val set, one hypothesis and 5 references each, the corpus score
    ``cider_d`` against ``Cider().compute_score`` (the same numbers, checked here).

Captions are pseudo-captions of COCO length (10 +- 2 words, 6 to 18) from a fixed word list and
a seeded RNG: per image a few "content" words drawn from a Zipf-like list, mixed with common
function words, so hypotheses and references of an image share n-grams as real ones do. Inputs
are pre-tokenised (space-joined lower-case words) for both sides unless the mode says
``tokenize``. Ratios come from ``conftest.interleaved_ratio`` (interleaved pairs, median of the
per-pair ratios, with the quartiles); ``slow_ms``/``fast_ms`` are the median ms per call. No
timing is asserted: these are numbers of a shared 2-core machine; the outputs are asserted equal.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import interleaved_ratio
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from fastcap.cider import CiderD, cider_d

B, K, R = 64, 5, 5  # SCST: images, samples per image, references per image
VAL_IMAGES = 5000
CORPUS_IMAGES = 10000  # the "training split" whose df corpus mode uses

_FUNCTION = "a a a an the the the of on in in with and is are at to near next by two three some"
FUNCTION_WORDS = _FUNCTION.split()
_CONTENT = (
    "man woman person people boy girl child dog cat horse bird cow sheep elephant giraffe "
    "zebra bear car bus truck train bike motorcycle plane boat street road table plate food "
    "pizza sandwich cake bowl cup kitchen room bed couch chair tv laptop phone book clock "
    "building sign water beach ocean grass field snow tree park sky kite umbrella bench "
    "fence window door wall floor shirt hat jacket ball frisbee skateboard surfboard skis "
    "tennis racket bat game player team crowd group large small white black red blue green "
    "yellow brown young old tall little big standing sitting walking riding holding playing "
    "eating looking laying flying parked covered filled front top side open wooden sunny busy"
)
CONTENT_WORDS = _CONTENT.split()


def make_captions(rng: random.Random, n_images: int, n_caps: int) -> list[list[str]]:
    """``n_images`` lists of ``n_caps`` pseudo-captions each; the lists share content words."""
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(CONTENT_WORDS))]  # Zipf-like
    out = []
    for _ in range(n_images):
        topic = rng.choices(CONTENT_WORDS, weights, k=6)
        caps = []
        for _ in range(n_caps):
            L = min(18, max(6, round(rng.gauss(10, 2))))
            words = [
                rng.choice(topic)
                if rng.random() < 0.45
                else rng.choice(FUNCTION_WORDS)
                if rng.random() < 0.6
                else rng.choices(CONTENT_WORDS, weights)[0]
                for _ in range(L)
            ]
            caps.append(" ".join(words))
        out.append(caps)
    return out


def pyco_scorer(hyps, refs) -> np.ndarray:
    """pycocoevalcap's CiderScorer on (hypothesis, references) pairs, as an SCST loop uses it."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for h, r in zip(hyps, refs):
        scorer += (h, r)
    return np.asarray(scorer.compute_score()[1])


@pytest.fixture(scope="module")
def scst():
    # image b's references and its K samples share one topic (one make_captions list)
    hyps, image_refs = [], []
    for b in range(B):
        pool = make_captions(random.Random(1000 + b), 1, R + K)[0]
        image_refs.append(pool[:R])
        hyps.extend(pool[R:])
    refs = [image_refs[i // K] for i in range(B * K)]
    corpus = make_captions(random.Random(2), CORPUS_IMAGES, R) + image_refs
    # the raw-text variant: capitalised, with punctuation, for the default simple_tokenize
    raw_hyps = [h.capitalize() + "." for h in hyps]
    raw_refs = [[r.capitalize() + " ." for r in rs] for rs in image_refs]
    return {
        "hyps": hyps,
        "refs": refs,
        "image_refs": image_refs,
        "index": np.repeat(np.arange(B), K),
        "corpus": corpus,
        "raw_hyps": raw_hyps,
        "raw_refs": [raw_refs[i // K] for i in range(B * K)],
    }


def report(benchmark, name: str, r: dict, **extra) -> None:
    info = {
        "ratio_median": round(r["median"], 2),
        "ratio_q1": round(r["q1"], 2),
        "ratio_q3": round(r["q3"], 2),
        "pycocoevalcap_ms": round(r["slow_s"] * 1e3, 2),
        "fastcap_ms": round(r["fast_s"] * 1e3, 3),
        "pairs": r["pairs"],
        **extra,
    }
    benchmark.extra_info.update(info)
    print(f"\n{name}: {json.dumps(info)}")


@pytest.mark.parametrize("mode", ["per_call", "per_call_refs_index", "per_call_tokenize", "corpus"])
def test_scst_reward(benchmark, scst, mode):
    hyps, refs = scst["hyps"], scst["refs"]
    want = pyco_scorer(hyps, refs)
    if mode == "per_call":
        scorer = CiderD(tokenize=None)
        ours = lambda: scorer.score(hyps, refs)
    elif mode == "per_call_refs_index":
        scorer = CiderD(tokenize=None)
        ours = lambda: scorer.score(hyps, scst["image_refs"], scst["index"])
    elif mode == "per_call_tokenize":  # raw text, simple_tokenize inside the timed call
        scorer = CiderD()
        ours = lambda: scorer.score(scst["raw_hyps"], scst["raw_refs"])
    else:
        scorer = CiderD(scst["corpus"], tokenize=None)  # df counted once, here
        ours = lambda: scorer.score(hyps, refs)
    got = ours()
    if mode != "corpus":  # the same definition on the same input: the same numbers
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    r = interleaved_ratio(lambda: pyco_scorer(hyps, refs), ours, (), pairs=11)
    benchmark.group = f"cider-d SCST reward B={B} K={K} refs={R}"
    benchmark.extra_info["impl"] = f"fastcap {mode}"
    report(benchmark, f"SCST {mode}", r, mean_reward=round(float(got.mean()), 4))
    benchmark.pedantic(ours, rounds=20, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def val():
    caps = make_captions(random.Random(3), VAL_IMAGES, R + 1)
    results = {i: c[0] for i, c in enumerate(caps)}
    references = {i: c[1:] for i, c in enumerate(caps)}
    return results, references


def test_val_corpus_score(benchmark, val):
    results, references = val
    gts = {k: references[k] for k in results}
    res = {k: [results[k]] for k in results}
    pyco = lambda: Cider().compute_score(gts, res)
    ours = lambda: cider_d(results, references, tokenize=None)
    want_mean, want = pyco()
    got_mean, got = ours()
    assert abs(got_mean - want_mean) <= 1e-6
    np.testing.assert_allclose([got[k] for k in results], want, atol=1e-6, rtol=0)
    r = interleaved_ratio(pyco, ours, (), pairs=3)
    benchmark.group = f"cider-d corpus score {VAL_IMAGES} images refs={R}"
    benchmark.extra_info["impl"] = "fastcap cider_d"
    report(benchmark, f"val {VAL_IMAGES}", r, cider_d=round(got_mean, 4))
    benchmark.pedantic(ours, rounds=3, iterations=1)
