"""fastcap.cider against its definition: pycocoevalcap's CiderScorer (CIDEr-D, Vedantam et al.
2015) number for number, and hand computations from the paper's formula for the corpus idf."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from fastcap.cider import CiderD, cider_d
from fastcap.metrics import caption_metrics, simple_tokenize

TOL = 1e-6  # absolute, on the x10 scale


def pyco(gts: dict, res: dict) -> tuple[float, np.ndarray]:
    """pycocoevalcap on {id: [refs]} and {id: hyp} (space-joined tokens)."""
    mean, scores = Cider().compute_score(gts, {k: [v] for k, v in res.items()})
    return float(mean), np.asarray(scores, np.float64)


def assert_matches(gts: dict, res: dict, msg: str = "") -> np.ndarray:
    """cider_d (per-call df) and CiderD.score both equal pycocoevalcap: mean and every id."""
    want_mean, want = pyco(gts, res)
    mean, per_id = cider_d(res, gts, tokenize=None)
    got = np.array([per_id[k] for k in res])
    assert abs(mean - want_mean) <= TOL, (mean, want_mean, msg)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=msg)
    ids = list(res)
    got2 = CiderD(tokenize=None).score([res[k] for k in ids], [gts[k] for k in ids])
    np.testing.assert_allclose(got2, want, rtol=0, atol=TOL, err_msg=msg)
    return got


def random_caption(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


# ----------------------------------------------------------------------- (1) per-call df mode


def test_tiny_hand_made_case_matches_pycocoevalcap():
    gts = {
        "img1": ["a man riding a horse", "a person on a horse in a field"],
        "img2": ["two dogs play in the snow", "dogs running in snow", "a dog in the snow"],
        "img3": ["a plate of food on a table"],
    }
    res = {"img1": "a man on a horse", "img2": "a dog runs in the snow", "img3": "a table"}
    got = assert_matches(gts, res)
    assert (got > 0).all()


def test_random_captions_match_pycocoevalcap(test_seed):
    print(f"FASTCAP_TEST_SEED={test_seed}")
    rng = random.Random(test_seed)
    vocab = list("abcdefg")  # small: many shared and repeated n-grams
    for trial in range(5):
        n_img = rng.randint(2, 40)
        gts = {
            i: [random_caption(rng, vocab, 0, 14) for _ in range(rng.randint(1, 6))]
            for i in range(n_img)
        }
        res = {i: random_caption(rng, vocab, 0, 16) for i in range(n_img)}
        assert_matches(gts, res, msg=f"seed {test_seed} trial {trial}")


def test_edge_cases_match_pycocoevalcap():
    gts = {
        "empty_hyp": ["a cat sits on a mat", "a cat on the mat"],
        "long_hyp": ["a red car", "red car parked"],
        "single_ref": ["a boy kicks a ball across the grass"],
        "repeats": ["a dog and a dog", "the dog runs"],
        "identical": ["a woman holding an umbrella in the rain", "a woman with an umbrella"],
        "empty_ref": ["", "a bird on a branch"],
        "one_word": ["bird", "a small bird"],
    }
    res = {
        "empty_hyp": "",
        "long_hyp": "a red car parked on the side of a busy street next to a tall building "
        "with many windows and a red car",
        "single_ref": "a boy kicks a ball",
        "repeats": "a dog a dog a dog a dog dog dog",
        "identical": "a woman holding an umbrella in the rain",
        "empty_ref": "a bird on a branch",
        "one_word": "bird",
    }
    got = dict(zip(res, assert_matches(gts, res)))
    assert got["empty_hyp"] == 0.0
    assert got["identical"] > 0 and got["single_ref"] > 0
    # a single image: N = 1, every idf is log 1 - log 1 = 0, as in pycocoevalcap
    one = {"identical": gts["identical"]}
    np.testing.assert_allclose(
        cider_d({"identical": res["identical"]}, one, tokenize=None)[0], 0.0, atol=TOL
    )
    assert_matches(one, {"identical": res["identical"]})


def test_scst_repeated_refs_and_refs_index_match_pycocoevalcap(test_seed):
    """B images x K samples: the expanded input (each list K times) is what pycocoevalcap
    sees; refs_index and token-list input give the same numbers."""
    rng = random.Random(test_seed + 1)
    vocab = list("abcdefghi")
    B, K = 6, 4
    image_refs = [[random_caption(rng, vocab, 1, 10) for _ in range(5)] for _ in range(B)]
    hyps = [random_caption(rng, vocab, 0, 12) for _ in range(B * K)]
    # fresh list objects with equal contents: dedup is by content, not identity
    refs = [list(image_refs[i // K]) for i in range(B * K)]
    _, want = pyco(dict(enumerate(refs)), dict(enumerate(hyps)))
    scorer = CiderD(tokenize=None)
    np.testing.assert_allclose(scorer.score(hyps, refs), want, atol=TOL, rtol=0)
    index = np.repeat(np.arange(B), K)
    extra = image_refs + [["an unused reference list"]]  # unused lists add no documents
    np.testing.assert_allclose(scorer.score(hyps, extra, refs_index=index), want, atol=TOL)
    tok_hyps = [h.split() for h in hyps]
    tok_refs = [[r.split() for r in rs] for rs in image_refs]
    np.testing.assert_allclose(scorer.score(tok_hyps, tok_refs, index), want, atol=TOL, rtol=0)


def test_default_tokenizer_is_simple_tokenize():
    gts = {1: ["A Dog, running!", "the dog runs."], 2: ["Two cats (sleeping)", "cats sleep"]}
    res = {1: "A dog running.", 2: "Two cats sleep!"}
    want_mean, want = pyco(
        {k: [simple_tokenize(c) for c in v] for k, v in gts.items()},
        {k: simple_tokenize(v) for k, v in res.items()},
    )
    mean, per_id = cider_d(res, gts)
    assert abs(mean - want_mean) <= TOL
    np.testing.assert_allclose([per_id[1], per_id[2]], want, atol=TOL, rtol=0)


def test_bad_inputs_raise():
    scorer = CiderD()
    with pytest.raises(ValueError):
        scorer.score(["a b"], [["a b"], ["c"]])
    with pytest.raises(ValueError):
        scorer.score(["a b"], [[]])
    with pytest.raises(TypeError):
        scorer.score(["a b"], ["a b"])
    with pytest.raises(IndexError):
        scorer.score(["a b"], [["a b"]], refs_index=[1])
    with pytest.raises(KeyError):
        cider_d({1: "a"}, {2: ["a"]})
    assert scorer.score([], []).shape == (0,)


# ----------------------------------------------------------------------- (2) corpus df mode


def test_corpus_equal_to_scored_refs_equals_per_call_mode(test_seed):
    rng = random.Random(test_seed + 2)
    vocab = list("abcdef")
    refs = [
        [random_caption(rng, vocab, 0, 12) for _ in range(rng.randint(1, 5))] for _ in range(30)
    ]
    hyps = [random_caption(rng, vocab, 0, 12) for _ in range(30)]
    per_call = CiderD(tokenize=None).score(hyps, refs)
    corpus = CiderD(refs, tokenize=None).score(hyps, refs)
    np.testing.assert_allclose(corpus, per_call, atol=TOL, rtol=0, err_msg=f"seed {test_seed}")
    # and the corpus df stays fixed when a call scores only a few of its images
    sub = CiderD(refs, tokenize=None).score(hyps[:3], refs[:3])
    np.testing.assert_allclose(sub, per_call[:3], atol=TOL, rtol=0)


def paper_cider_d_one_ref(hyp: str, ref: str, corpus: list[list[str]], sigma: float = 6.0):
    """CIDEr-D of ``hyp`` against one reference, written out from Vedantam et al. (2015):
    g_k(s) = h_k(s) log(|I| / max(1, #images whose references contain w_k)); sim_k = Gaussian
    length penalty x sum_w min(g(c), g(s)) g(s) / (|g(c)| |g(s)|); mean over k = 1..4, x10."""
    N = len(corpus)

    def grams(words, k):
        out = {}
        for i in range(len(words) - k + 1):
            out[tuple(words[i : i + k])] = out.get(tuple(words[i : i + k]), 0) + 1
        return out

    def idf(w):
        k = len(w)
        df = sum(any(w in grams(r.split(), k) for r in refs) for refs in corpus)
        return math.log(N / max(1, df))

    c, s = hyp.split(), ref.split()
    total = 0.0
    for k in range(1, 5):
        gc = {w: t * idf(w) for w, t in grams(c, k).items()}
        gs = {w: t * idf(w) for w, t in grams(s, k).items()}
        dot = sum(min(v, gs.get(w, 0.0)) * gs.get(w, 0.0) for w, v in gc.items())
        nc = math.sqrt(sum(v * v for v in gc.values()))
        ns = math.sqrt(sum(v * v for v in gs.values()))
        total += dot / (nc * ns) if nc and ns else 0.0
    penalty = math.exp(-((len(c) - len(s)) ** 2) / (2 * sigma**2))
    return 10.0 * penalty * total / 4


def test_corpus_idf_by_hand():
    # hyp "a a" vs ref "a c": only unigram "a" is shared, and the hypothesis has it twice,
    # so its weight is clipped: sim_1 = idf_a^2 / (2 idf_a sqrt(idf_a^2 + idf_c^2)).
    corpus1 = [["a c"], ["a e"], ["f g"]]  # N = 3, df(a) = 2, df(c) = 1
    ia, ic = math.log(3 / 2), math.log(3)
    want1 = 10 / 4 * ia / (2 * math.sqrt(ia**2 + ic**2))
    corpus2 = [["a c"], ["c"], ["a"], ["a b"], ["z"]]  # N = 5, df(a) = 3, df(c) = 2
    ia, ic = math.log(5 / 3), math.log(5 / 2)
    want2 = 10 / 4 * ia / (2 * math.sqrt(ia**2 + ic**2))
    assert abs(want1 - want2) > 0.05  # the corpus matters
    for corpus, want in ((corpus1, want1), (corpus2, want2)):
        got = CiderD(corpus, tokenize=None).score(["a a"], [["a c"]])[0]
        assert abs(got - want) <= TOL, (corpus, got, want)
        assert abs(paper_cider_d_one_ref("a a", "a c", corpus) - want) <= 1e-12

    # the length penalty and higher orders: "a c" vs "a c e f", corpus N = 3, df(a) = 2
    corpus3 = [["a c e f"], ["a"], ["q"]]
    ia, i1 = math.log(3 / 2), math.log(3)
    sim1 = (ia**2 + i1**2) / (math.sqrt(ia**2 + i1**2) * math.sqrt(ia**2 + 3 * i1**2))
    sim2 = i1**2 / (i1 * math.sqrt(3) * i1)  # "a c" against {"a c", "c e", "e f"}
    want3 = 10 / 4 * math.exp(-((2 - 4) ** 2) / (2 * 6.0**2)) * (sim1 + sim2)
    got3 = CiderD(corpus3, tokenize=None).score(["a c"], [["a c e f"]])[0]
    assert abs(got3 - want3) <= TOL, (got3, want3)

    # a hypothesis n-gram absent from the corpus gets df 1 (idf log N); a random check against
    # the paper-formula function on a mixed corpus, references not in the corpus
    rng = random.Random(7)
    vocab = list("abcde")
    corpus4 = [[random_caption(rng, vocab, 1, 8) for _ in range(3)] for _ in range(12)]
    scorer = CiderD(corpus4, tokenize=None)
    for _ in range(20):
        h, r = random_caption(rng, vocab + ["z"], 1, 9), random_caption(rng, vocab, 1, 9)
        want = paper_cider_d_one_ref(h, r, corpus4)
        assert abs(scorer.score([h], [[r]])[0] - want) <= TOL, (h, r)


# ----------------------------------------------------------------------- (3) real captions


def read_flickr_captions(folder) -> dict[str, list[str]]:
    caps: dict[str, list[str]] = {}
    for line in (folder / "captions.txt").read_text().splitlines()[1:]:
        image, caption = line.split(",", 1)  # a caption may contain commas
        caps.setdefault(image, []).append(caption)
    return caps


def test_cider_d_matches_caption_metrics_on_flickr8k(flickr8k_1k):
    caps = read_flickr_captions(flickr8k_1k)
    images = sorted(caps)[:200]
    assert all(len(caps[k]) == 5 for k in images)
    # leave-one-out: the first caption is the hypothesis, the other four the references
    results = {k: caps[k][0] for k in images}
    references = {k: caps[k][1:] for k in images}
    mean, per_id = cider_d(results, references)
    want = caption_metrics(results, references, java=False)["CIDEr-D"]
    assert abs(mean - want) <= TOL, (mean, want)
    assert 0.2 < mean < 3.0  # human captions of the same photo: a sane CIDEr-D
    _, want_per_id = pyco(
        {k: [simple_tokenize(c) for c in references[k]] for k in images},
        {k: simple_tokenize(results[k]) for k in images},
    )
    np.testing.assert_allclose([per_id[k] for k in images], want_per_id, atol=TOL, rtol=0)
