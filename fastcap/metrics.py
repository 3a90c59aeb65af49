"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (pycocoevalcap) and the shapes score.

pycocoevalcap is the reference implementation of the COCO caption server; we call it as the
server does: both sides go through the Stanford PTB tokenizer (Java; lower-cases and removes
punctuation), then each scorer sees ``{id: [tokenised caption, ...]}``.

CIDEr-D: pycocoevalcap names its scorer ``Cider``, but its ``CiderScorer`` (read in the
installed 1.2 source) is CIDEr-D as defined by Vedantam et al. (2015): the hypothesis n-gram
weights are clipped to the reference's (``min(vec_hyp, vec_ref) * vec_ref``), a Gaussian length
penalty ``exp(-(len_hyp - len_ref)^2 / (2 * 6^2))`` multiplies each n-gram similarity, no
stemming is applied, and the mean over n = 1..4 is scaled by 10. The document frequencies come
from the references of the images being scored, so the value depends on the evaluated set (as
on the COCO server). We report it as ``CIDEr-D``.

Without Java (``java`` not on PATH) the PTB tokenizer and METEOR cannot run: a warning says so
and the Java-free metrics (BLEU, ROUGE-L, CIDEr-D) are returned on text tokenised by lower-casing,
dropping punctuation and splitting on whitespace. For plain lower-case captions (the shapes
captions) that tokenisation equals the PTB one, so the numbers agree.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

log = logging.getLogger("fastcap.metrics")

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")
# Characters the PTB tokenizer splits off and pycocoevalcap then drops.
_PUNCT = re.compile(r"[.,!?;:'`\"()\[\]{}\-]+")


def _check(results: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    if not results:
        raise ValueError("caption_metrics: `results` is empty; nothing to score")
    missing = [k for k in results if k not in references]
    if missing:
        raise KeyError(f"caption_metrics: no references for ids {missing[:5]} (of {len(missing)})")
    for k in results:
        if not isinstance(results[k], str):
            raise TypeError(f"caption_metrics: result {k!r} must be a str, got {type(results[k])}")
        refs = references[k]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"caption_metrics: references[{k!r}] must be a non-empty list of str")


def simple_tokenize(text: str) -> str:
    """The Java-free stand-in for the PTB tokenizer: lower case, punctuation dropped."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One caption per line goes to the Java tokenizer: a newline inside a caption would shift
    # every later caption onto the wrong image.
    fmt = {k: [{"caption": c.replace("\n", " ")} for c in v] for k, v in captions.items()}
    return PTBTokenizer().tokenize(fmt)


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        # Stop the Java process now rather than whenever the object is collected.
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score)


def caption_metrics(
    results: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    java: bool | None = None,
) -> dict[str, float]:
    """Corpus-level caption metrics over the ids of ``results``.

    Args:
        results: id -> the generated caption.
        references: id -> the reference captions (a non-empty list); ids not in ``results``
            are ignored.
        java: None uses Java when ``java`` is on PATH; True requires it (RuntimeError if
            missing); False skips it (no METEOR, simple tokenisation).

    Returns:
        {"BLEU-1", ..., "BLEU-4", "ROUGE-L", "CIDEr-D"} and, with Java, "METEOR"; floats in
        [0, 1] except CIDEr-D (0 to 10).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check(results, references)
    have_java = shutil.which("java") is not None
    if java and not have_java:
        raise RuntimeError("caption_metrics(java=True): `java` is not on PATH; install Java 17")
    use_java = have_java if java is None else java
    if java is None and not have_java:
        log.warning(
            "java not found on PATH: METEOR is skipped and captions are tokenised by lower-casing "
            "and whitespace splitting instead of the PTB tokenizer. Install Java 17 "
            "(e.g. apt-get install openjdk-17-jre-headless) for the full COCO metrics."
        )

    ids = list(results)
    if use_java:
        gts = _ptb_tokenize({k: list(references[k]) for k in ids})
        res = _ptb_tokenize({k: [results[k]] for k in ids})
    else:
        gts = {k: [simple_tokenize(c) for c in references[k]] for k in ids}
        res = {k: [simple_tokenize(results[k])] for k in ids}

    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, start=1):
        out[f"BLEU-{n}"] = float(b)
    if use_java:
        out["METEOR"] = _meteor(gts, res)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    return out


def shapes_accuracy(
    results: Mapping[Hashable, str], records: Mapping[Hashable, Mapping[str, Any]]
) -> float:
    """Fraction of ``results`` whose caption is exactly right for its image.

    Args:
        results: id -> generated caption.
        records: id -> the image's record of the shapes ``dataset.json``
            (see :func:`fastcap.data.shapes.read_records`).

    A caption is right iff it parses to the same multiset of (size, colour, shape) and, for two
    objects, the same relation in either phrasing; an unparseable caption is wrong.
    """
    from fastcap.data.shapes import caption_correct

    if not results:
        raise ValueError("shapes_accuracy: `results` is empty; nothing to score")
    missing = [k for k in results if k not in records]
    if missing:
        raise KeyError(f"shapes_accuracy: no image record for ids {missing[:5]}")
    return sum(caption_correct(results[k], records[k]) for k in results) / len(results)
