"""Caption metrics on a small hand-made case with values worked out by hand (BLEU, ROUGE-L) or by
an independent slow definition (CIDEr-D), the Java-free fallback, and the shapes score."""

from __future__ import annotations

import logging
import math
import shutil
from collections import Counter

import numpy as np
import pytest

from fastcap import metrics
from fastcap.data.shapes import references, sample_scene
from fastcap.metrics import caption_metrics, shapes_accuracy

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java (17) not on PATH")
# Tests marked slow call Java: the PTB tokenizer twice and METEOR once, about 20 s on 2 cores.

RESULTS = {1: "the cat sat on the mat", 2: "a dog runs in the park"}
REFS = {
    1: ["the cat sat on the mat", "there is a cat on the mat"],
    2: ["a dog plays in the park"],
    3: ["an image nobody captioned"],  # ids absent from the results are ignored
}
# Corpus n-gram matches (clipped, best reference) over hypothesis n-grams, worked by hand:
#   image 1 equals its first reference: 6/6 unigrams, 5/5 bigrams, 4/4 trigrams, 3/3 4-grams;
#   image 2 vs "a dog plays in the park": a, dog, in, the, park -> 5/6; "a dog", "in the",
#   "the park" -> 3/5; "in the park" -> 1/4; no 4-gram -> 0/3.
# Closest reference lengths equal the hypothesis lengths (6, 6): brevity penalty 1.
P = [11 / 12, 8 / 10, 5 / 8, 3 / 6]
BLEU = {f"BLEU-{n}": math.prod(P[:n]) ** (1 / n) for n in range(1, 5)}
# ROUGE-L (beta 1.2): image 1 exact -> 1; image 2 LCS "a dog in the park" = 5 of 6 both ways
# -> F = 5/6; mean 11/12.
ROUGE_L = 11 / 12
TOL = 1e-6  # pycocoevalcap's BLEU adds 1e-15 / 1e-9 smoothing terms


def cider_d_slow(results, refs, n_max=4, sigma=6.0):
    """CIDEr-D as coco-caption computes it, written out with explicit loops: tf-idf over raw
    n-gram counts with document frequencies from the scored images' references, clipped
    hypothesis weights, Gaussian length penalty on the (bigram-count) length, mean over n,
    mean over references, times 10, mean over images."""
    ids = list(results)
    grams = lambda s, n: Counter(tuple(s.split()[i : i + n]) for i in range(len(s.split()) - n + 1))
    df = Counter()
    for k in ids:
        seen = set()
        for r in refs[k]:
            for n in range(1, n_max + 1):
                seen |= set(grams(r, n))
        df.update(seen)
    log_n = math.log(len(ids))

    def vec(s, n):
        return {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in grams(s, n).items()}

    total = 0.0
    for k in ids:
        hyp = results[k]
        img = 0.0
        for r in refs[k]:
            # coco-caption measures length as the number of bigrams (words - 1)
            delta = sum(grams(hyp, 2).values()) - sum(grams(r, 2).values())
            for n in range(1, n_max + 1):
                vh, vr = vec(hyp, n), vec(r, n)
                num = sum(min(w, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, w in vh.items())
                nh = math.sqrt(sum(w * w for w in vh.values()))
                nr = math.sqrt(sum(w * w for w in vr.values()))
                val = num / (nh * nr) if nh and nr else num
                img += val * math.exp(-(delta**2) / (2 * sigma**2)) / n_max
        total += 10.0 * img / len(refs[k])
    return total / len(ids)


@pytest.fixture(scope="module")
def java_scores():
    if shutil.which("java") is None:
        pytest.skip("java (17) not on PATH")
    return caption_metrics(RESULTS, REFS)


@pytest.mark.slow
@needs_java
def test_known_values_with_java(java_scores):
    s = java_scores
    assert set(s) == set(metrics.METRIC_NAMES)
    for k, v in BLEU.items():
        assert s[k] == pytest.approx(v, abs=TOL), k
    assert s["ROUGE-L"] == pytest.approx(ROUGE_L, abs=TOL)
    assert s["CIDEr-D"] == pytest.approx(cider_d_slow(RESULTS, REFS), abs=TOL)
    # METEOR has no closed form here (stemming, paraphrase tables): an exact match and one
    # near-miss score high but below 1.
    assert 0.5 < s["METEOR"] < 1.0


@pytest.mark.slow
@needs_java
def test_ptb_tokenizer_ignores_case_and_punctuation(java_scores):
    noisy = {1: "The cat sat on the mat.", 2: "A dog runs, in the park!"}
    refs = {k: [r.capitalize() + "." for r in v] for k, v in REFS.items()}
    s = caption_metrics(noisy, refs, java=True)
    for k in metrics.METRIC_NAMES:
        assert s[k] == pytest.approx(java_scores[k], abs=1e-12), k


def test_java_free_path_matches_on_plain_captions(caplog):
    s = caption_metrics(RESULTS, REFS, java=False)
    assert set(s) == set(metrics.METRIC_NAMES) - {"METEOR"}
    for k, v in BLEU.items():
        assert s[k] == pytest.approx(v, abs=TOL), k
    assert s["ROUGE-L"] == pytest.approx(ROUGE_L, abs=TOL)
    assert s["CIDEr-D"] == pytest.approx(cider_d_slow(RESULTS, REFS), abs=TOL)
    assert metrics.simple_tokenize("A Dog, runs!  (fast).") == "a dog runs fast"


def test_cider_d_random_captions_against_slow_definition():
    rng = np.random.default_rng()
    words = [
        "a",
        "the",
        "red",
        "blue",
        "cat",
        "dog",
        "sits",
        "runs",
        "on",
        "in",
        "park",
        "mat",
        "big",
        "small",
    ]
    sent = lambda: " ".join(rng.choice(words, size=int(rng.integers(2, 11))))
    ids = range(int(rng.integers(2, 8)))
    res = {k: sent() for k in ids}
    refs = {k: [sent() for _ in range(int(rng.integers(1, 5)))] for k in ids}
    s = caption_metrics(res, refs, java=False)
    assert s["CIDEr-D"] == pytest.approx(cider_d_slow(res, refs), rel=1e-9, abs=1e-12)


def test_missing_java_warns_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="fastcap.metrics"):
        s = caption_metrics(RESULTS, REFS)
    assert "METEOR" not in s and s["BLEU-1"] == pytest.approx(BLEU["BLEU-1"], abs=TOL)
    assert "java not found" in caplog.text and "METEOR is skipped" in caplog.text
    with pytest.raises(RuntimeError, match="java"):
        caption_metrics(RESULTS, REFS, java=True)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        caption_metrics({}, REFS, java=False)
    with pytest.raises(KeyError, match="no references for ids"):
        caption_metrics({9: "a cat"}, REFS, java=False)
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics({1: "a cat"}, {1: []}, java=False)
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics({1: "a cat"}, {1: "a cat"}, java=False)
    with pytest.raises(TypeError, match="must be a str"):
        caption_metrics({1: ["a cat"]}, REFS, java=False)


# ---- the shapes semantic score -------------------------------------------------------------


def _records(n: int):
    rng = np.random.default_rng()
    recs = {}
    for i in range(n):
        split = "compositional" if i % 4 == 0 else "train"
        objects, relation = sample_scene(rng, split, 64)
        raws = references(objects, relation)
        recs[i] = {
            "objects": objects,
            "relation": relation,
            "sentences": [{"raw": r} for r in raws],
        }
    return recs


def test_shapes_accuracy_of_references_is_one():
    recs = _records(200)
    for j in range(3):  # every reference phrasing
        res = {k: r["sentences"][j]["raw"] for k, r in recs.items()}
        assert shapes_accuracy(res, recs) == 1.0


def test_shapes_accuracy_known_value():
    rec = {
        "objects": [
            {"shape": "circle", "color": "red", "size": "small"},
            {"shape": "star", "color": "blue", "size": "large"},
        ],
        "relation": "left",
    }
    res = {
        0: "a large blue star to the right of a small red circle",  # right, other phrasing
        1: "a small red circle above a large blue star",  # wrong relation
        2: "a small blue circle to the left of a large red star",  # swapped colours
        3: "a small red circle to the left of a large blue star.",  # right (final period)
        4: "red circle, blue star",  # unparseable
    }
    assert shapes_accuracy(res, dict.fromkeys(res, rec)) == pytest.approx(2 / 5)
    with pytest.raises(KeyError, match="no image record"):
        shapes_accuracy({7: "a small red circle"}, {0: rec})
    with pytest.raises(ValueError, match="empty"):
        shapes_accuracy({}, {0: rec})
