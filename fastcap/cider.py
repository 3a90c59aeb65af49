"""A fast CIDEr-D scorer: model selection on a validation set, and SCST rewards.

Definition: CIDEr-D of Vedantam, Zitnick and Parikh, "CIDEr: Consensus-based Image Description
Evaluation" (CVPR 2015, arXiv:1411.5726), as implemented by pycocoevalcap's ``CiderScorer``
(``pycocoevalcap/cider/cider_scorer.py``, the COCO caption server's code), which is the reference
this module matches number for number. For a hypothesis ``c`` of image ``i`` with references
``S_i = {s_1, ..., s_m}`` and n-gram orders ``k = 1..n`` (n = 4):

* every sentence is a vector of tf-idf weights over its k-grams ``w``:
  ``g_w(s) = h_w(s) * (log N - log max(1, df(w)))``, where ``h_w(s)`` is the count of ``w`` in
  ``s``, ``N`` the number of documents (images) and ``df(w)`` the number of documents whose
  reference captions contain ``w`` at least once (a document is one image's reference list);
* the order-k similarity of ``c`` and a reference ``s`` is the cosine of their k-gram vectors
  with the hypothesis weights clipped to the reference's (the "-D": a repeated n-gram earns no
  more than the reference has), times a Gaussian length penalty:
  ``sim_k(c, s) = exp(-(l(c) - l(s))^2 / (2 sigma^2)) * sum_w min(g_w(c), g_w(s)) g_w(s)
  / (|g(c)| |g(s)|)``, 0 when either norm is 0; sigma = 6;
* ``CIDEr-D(c, S_i) = 10 / n * sum_k 1 / m * sum_j sim_k(c, s_j)``.

Two details follow the reference implementation rather than the paper's prose:

* the length ``l(s)`` is the number of bigrams of ``s``, ``max(len(s) - 1, 0)`` (CiderScorer
  counts the terms of its order-2 vector); differences of lengths equal the paper's except when
  one sentence is empty, and then the similarity is 0 whatever the penalty, so the two
  conventions give the same scores;
* in ``pycocoevalcap`` the documents are the evaluated set: the reference lists of the images
  being scored, one per (hypothesis, references) entry. Here that is the default ("per-call
  df"); ``CiderD(corpus_refs)`` instead fixes the df and N once from a corpus (for SCST: every
  training image's references, as ruotianluo's self-critical.pytorch does with its
  "coco-train-idxs" df), so a reward does not depend on which images share its batch.

Speed. CiderScorer counts n-grams in Python dicts, rebuilds every reference vector once per
hypothesis and loops over n-grams in Python. Here each call tokenises and interns every distinct
sentence once (tokens to persistent ints; k-grams to per-call ints, level by level, with
``numpy.unique`` on ``(id of the (k-1)-gram, id of the last token)``), builds one sorted sparse
table of (sentence, n-gram) counts, computes the idf, norms and clipped dot products of all
(hypothesis, reference) pairs with vectorised numpy, and shares each image's reference vectors
among all hypotheses of that image (the K samples of SCST; pass ``refs_index`` or the same list
K times). See ``bench/bench_cider.py`` for the measured speed-ups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

from fastcap.metrics import simple_tokenize

__all__ = ["CiderD", "cider_d"]

# A caption: a string (tokenised by ``tokenize``, or split on whitespace when it is None) or an
# already tokenised sequence of words.
Caption = str | Sequence[str]


class _Vocab(dict):
    """word -> persistent int id; an unseen word gets the next id on first lookup."""

    def __missing__(self, word: str) -> int:
        i = self[word] = len(self)
        return i


def _lookup(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each of ``keys`` in the sorted, unique ``table``, or -1 where it is absent."""
    if table.size == 0 or keys.size == 0:
        return np.full(keys.shape, -1, np.int64)
    pos = np.searchsorted(table, keys)
    pos = np.minimum(pos, table.size - 1)
    return np.where(table[pos] == keys, pos, -1)


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int array; sorting is several times faster here than the
    hash table ``numpy.unique`` uses for large int arrays without ``return_*`` (numpy 2.4)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


class _Ngrams:
    """The k-grams (k = 1..n) of a batch of sentences, each interned to a dense int per order.

    ``tok`` (T,) holds the token ids of all sentences back to back, ``lens`` (S,) their lengths.
    For order k, ``starts[k-1]`` (T_k,) are the flat positions where a k-gram starts (it fits in
    its sentence) and ``ids[k-1]`` (T_k,) the k-gram's id among this batch's distinct k-grams,
    ``keys[k-1]`` (G_k,) sorted: the k-gram with id j is ``keys[k-1][j]``, encoded as its token
    id (k = 1) or ``(id of its first k-1 tokens) << 32 | (id of its last token)``.
    """

    def __init__(self, tok: np.ndarray, lens: np.ndarray, n: int):
        self.lens = lens
        self.sent = np.repeat(np.arange(lens.size), lens)  # (T,) sentence of each token
        first = np.cumsum(lens) - lens  # (S,) flat position of each sentence's first token
        left = lens[self.sent] - (np.arange(tok.size) - first[self.sent])  # (T,) tokens from here
        self.starts, self.ids, self.keys = [], [], []
        prev = None  # (T,) id of the (k-1)-gram starting at each position, -1 where none
        for k in range(1, n + 1):
            start = np.flatnonzero(left >= k)
            if k == 1:
                key = tok
            else:
                # a (k-1)-gram starts wherever a k-gram does; its last token is at start + k - 1
                key = (prev[start] << 32) | self.ids[0][start + k - 1]
            uniq, inv = np.unique(key, return_inverse=True)
            cur = np.full(tok.size, -1, np.int64)
            cur[start] = inv
            self.starts.append(start)
            self.ids.append(inv.astype(np.int64, copy=False) if k > 1 else cur)
            self.keys.append(uniq)
            prev = cur
        # for k = 1 every position starts a unigram, so ids[0] is indexed by flat position too
        self.sizes = [u.size for u in self.keys]  # G_k
        self.offsets = np.cumsum([0] + self.sizes)  # order k's ids are offsets[k-1] + ids


class CiderD:
    """CIDEr-D (Vedantam et al. 2015) with n = 1..4, sigma 6, clipped hypothesis weights, x10:
    exactly pycocoevalcap's ``CiderScorer`` (see the module docstring for the formula).

    Args:
        corpus_refs: the reference lists (one per image) whose document frequencies define the
            idf, counted once here; for SCST, every training image's references. None: the df
            comes from the references passed to each :meth:`score` call, as pycocoevalcap does
            (the evaluated set).
        n: the largest n-gram order (pycocoevalcap: 4).
        sigma: the standard deviation of the Gaussian length penalty (pycocoevalcap: 6).
        tokenize: applied to every caption given as a ``str`` (hypotheses, references and
            ``corpus_refs`` alike); it returns a space-joined string or a list of words. The
            default is :func:`fastcap.metrics.simple_tokenize` (lower case, punctuation dropped);
            None splits strings on whitespace only (pre-tokenised, space-joined input). A caption
            given as a list or tuple of words is used as it is.
    """

    def __init__(
        self,
        corpus_refs: Sequence[Sequence[Caption]] | None = None,
        *,
        n: int = 4,
        sigma: float = 6.0,
        tokenize: Callable[[str], str | Sequence[str]] | None = simple_tokenize,
    ):
        if n < 1:
            raise ValueError(f"CiderD: n must be >= 1, got {n}")
        if not sigma > 0:
            raise ValueError(f"CiderD: sigma must be > 0, got {sigma}")
        self.n = n
        self.sigma = float(sigma)
        self.tokenize = tokenize
        self._vocab = _Vocab()
        self._corpus = None
        if corpus_refs is not None:
            self._corpus = self._build_corpus(corpus_refs)

    # ------------------------------------------------------------------------------ inputs

    def _words(self, caption: Caption) -> list[str]:
        if isinstance(caption, str):
            out = self.tokenize(caption) if self.tokenize is not None else caption
            return out.split() if isinstance(out, str) else list(out)
        return list(caption)

    def _encode(self, sentences: Sequence[Caption]) -> tuple[np.ndarray, np.ndarray]:
        """(T,) persistent token ids of all sentences back to back, and (S,) their lengths."""
        words: list[str] = []
        lens = np.empty(len(sentences), np.int64)
        for s, sentence in enumerate(sentences):
            w = self._words(sentence)
            lens[s] = len(w)
            words.extend(w)
        tok = np.fromiter(map(self._vocab.__getitem__, words), np.int64, len(words))
        return tok, lens

    # ------------------------------------------------------------------------------ corpus df

    def _build_corpus(self, corpus_refs: Sequence[Sequence[Caption]]) -> dict:
        """Per order k: the sorted keys of the corpus's k-grams (their corpus ids are their
        positions) and the number of corpus documents containing each."""
        if isinstance(corpus_refs, str) or len(corpus_refs) == 0:
            raise ValueError("CiderD: corpus_refs must be a non-empty list of reference lists")
        sentences, doc = [], []
        for d, refs in enumerate(corpus_refs):
            if isinstance(refs, str):
                raise TypeError(f"CiderD: corpus_refs[{d}] must be a list of captions, not a str")
            sentences.extend(refs)
            doc.extend([d] * len(refs))
        tok, lens = self._encode(sentences)
        ng = _Ngrams(tok, lens, self.n)
        doc_of_sent = np.asarray(doc, np.int64)
        keys, df = [], []
        for k in range(self.n):
            g = ng.ids[k]  # (T_k,) corpus id of each k-gram occurrence
            G = ng.sizes[k]
            # one count per (document, k-gram) pair, however often the document repeats it
            pairs = _unique(doc_of_sent[ng.sent[ng.starts[k]]] * max(G, 1) + g)
            df.append(np.bincount(pairs % max(G, 1), minlength=G).astype(np.float64))
            keys.append(ng.keys[k])
        return {"keys": keys, "df": df, "log_n": math.log(len(corpus_refs))}

    def _corpus_df(self, ng: _Ngrams) -> np.ndarray:
        """(G,) the corpus df of each of this batch's n-grams (0 for those the corpus lacks).

        Looked up once per distinct k-gram of the batch, level by level: the batch's k-gram
        key names its (k-1)-gram head and last token by batch ids, whose corpus ids are known
        from the levels before; a k-gram is in the corpus only if both of those are."""
        c = self._corpus
        cids = []  # per order: (G_k,) corpus id of each of the batch's k-grams, -1 if absent
        for k in range(self.n):
            keys = ng.keys[k]
            if k == 0:
                cid = _lookup(c["keys"][0], keys)
            else:
                head, last = cids[k - 1][keys >> 32], cids[0][keys & 0xFFFFFFFF]
                ok = (head >= 0) & (last >= 0)
                cid = np.full(keys.size, -1, np.int64)
                cid[ok] = _lookup(c["keys"][k], (head[ok] << 32) | last[ok])
            cids.append(cid)
        cid = np.concatenate(cids)  # (G,) in the order of the batch's global n-gram ids
        corpus_df = np.concatenate(c["df"] + [np.zeros(1)])  # index -1: absent, df 0
        shift = np.repeat(np.cumsum([0] + [d.size for d in c["df"][:-1]]), ng.sizes)
        return corpus_df[np.where(cid >= 0, cid + shift, -1)]

    # ------------------------------------------------------------------------------ scoring

    def score(
        self,
        hyps: Sequence[Caption],
        refs: Sequence[Sequence[Caption]],
        refs_index: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """CIDEr-D of every hypothesis against its own reference list.

        Args:
            hyps: H hypotheses.
            refs: without ``refs_index``, H reference lists, ``refs[i]`` for ``hyps[i]``
                (lists with equal contents, e.g. one image's list repeated for its K samples,
                are vectorised once); with it, any number of distinct reference lists.
            refs_index: (H,) ints, ``hyps[i]`` is scored against ``refs[refs_index[i]]``. The
                result is the same as passing ``[refs[j] for j in refs_index]``.

        Returns:
            (H,) float64. Without ``corpus_refs`` the df counts, as pycocoevalcap does, one
            document per hypothesis entry (N = H; an image's list repeated K times counts K
            times), so ``score(hyps, refs)`` equals ``Cider().compute_score`` on
            ``{i: refs[i]}, {i: [hyps[i]]}``; with ``corpus_refs`` the corpus's df and N.
        """
        H = len(hyps)
        if isinstance(hyps, str):
            raise TypeError("CiderD.score: hyps must be a list of captions, not a str")
        if refs_index is None:
            if len(refs) != H:
                raise ValueError(f"CiderD.score: {H} hypotheses but {len(refs)} reference lists")
            # distinct reference lists by content: each is tokenised and vectorised once
            seen: dict[tuple, int] = {}
            docs: list[Sequence[Caption]] = []
            hyp_doc = np.empty(H, np.int64)
            for i, r in enumerate(refs):
                if isinstance(r, str):
                    raise TypeError(f"CiderD.score: refs[{i}] must be a list of captions")
                key = tuple(c if isinstance(c, str) else tuple(c) for c in r)
                j = seen.get(key)
                if j is None:
                    j = seen[key] = len(docs)
                    docs.append(r)
                hyp_doc[i] = j
        else:
            hyp_doc = np.asarray(refs_index, np.int64).reshape(-1)
            if hyp_doc.size != H:
                raise ValueError(f"CiderD.score: {H} hypotheses but {hyp_doc.size} refs_index")
            if H and (hyp_doc.min() < 0 or hyp_doc.max() >= len(refs)):
                raise IndexError(f"CiderD.score: refs_index out of range for {len(refs)} lists")
            # keep only the lists some hypothesis points at
            used, hyp_doc = np.unique(hyp_doc, return_inverse=True)
            docs = [refs[j] for j in used.tolist()]
            for j, r in zip(used.tolist(), docs):
                if isinstance(r, str):
                    raise TypeError(f"CiderD.score: refs[{j}] must be a list of captions")
        if H == 0:
            return np.zeros(0, np.float64)
        nref = np.fromiter((len(r) for r in docs), np.int64, len(docs))  # (D,)
        if (nref == 0).any():
            raise ValueError("CiderD.score: every hypothesis needs at least one reference")
        return self._score(hyps, docs, hyp_doc, nref)

    def _score(self, hyps, docs, hyp_doc, nref) -> np.ndarray:
        n, H, D = self.n, len(hyps), len(docs)
        # sentences 0..H-1 are the hypotheses, then the references of doc 0, doc 1, ...
        ref_first = H + np.cumsum(nref) - nref  # (D,) sentence index of each doc's first ref
        sentences = list(hyps)
        for r in docs:
            sentences.extend(r)
        tok, lens = self._encode(sentences)
        S = lens.size
        ng = _Ngrams(tok, lens, n)
        G = int(ng.offsets[-1])  # distinct n-grams of all orders in this call
        if G == 0:
            return np.zeros(H, np.float64)
        order = np.repeat(np.arange(n), ng.sizes)  # (G,) order - 1 of each n-gram id

        # the sparse (sentence, n-gram) count table, sorted by sentence then n-gram
        occ_sent = np.concatenate([ng.sent[ng.starts[k]] for k in range(n)])
        occ_gram = np.concatenate([ng.offsets[k] + ng.ids[k] for k in range(n)])
        ent_key, ent_cnt = np.unique(occ_sent * G + occ_gram, return_counts=True)  # (E,)
        ent_sent, ent_gram = ent_key // G, ent_key % G

        # document frequencies and N
        if self._corpus is None:
            # documents = the H (hypothesis, reference list) entries: doc d counts mult[d] times
            mult = np.bincount(hyp_doc, minlength=D).astype(np.float64)  # (D,)
            is_ref = ent_sent >= H
            ref_doc = np.repeat(np.arange(D), nref)  # (S - H,) doc of each reference sentence
            pairs = _unique(ref_doc[ent_sent[is_ref] - H] * G + ent_gram[is_ref])
            df = np.bincount(pairs % G, weights=mult[pairs // G], minlength=G)
            log_n = math.log(H)
        else:
            df = self._corpus_df(ng)
            log_n = self._corpus["log_n"]
        idf = log_n - np.log(np.maximum(df, 1.0))  # (G,)

        # tf-idf weights, per-(sentence, order) norms and the length of each sentence
        w = ent_cnt * idf[ent_gram]  # (E,)
        ent_order = order[ent_gram]
        norm = np.sqrt(np.bincount(ent_sent * n + ent_order, weights=w * w, minlength=S * n))
        norm = norm.reshape(S, n)
        length = np.maximum(lens - 1, 0)  # number of bigrams: CiderScorer's length

        # pairs (hypothesis i, j-th reference of its doc): P = sum_i nref[doc[i]]
        hyp_nref = nref[hyp_doc]  # (H,)
        P = int(hyp_nref.sum())
        pair_first = np.cumsum(hyp_nref) - hyp_nref  # (H,) first pair of each hypothesis
        pair_hyp = np.repeat(np.arange(H), hyp_nref)  # (P,)
        pair_ref = ref_first[hyp_doc][pair_hyp] + (np.arange(P) - pair_first[pair_hyp])  # (P,)

        # clipped dot products: every hypothesis entry meets every reference of its image
        E_h = int(np.searchsorted(ent_key, H * G))  # hypothesis entries come first
        h_sent, h_gram, h_w = ent_sent[:E_h], ent_gram[:E_h], w[:E_h]
        rep = hyp_nref[h_sent]  # (E_h,)
        q = np.repeat(np.arange(E_h), rep)  # (Q,) hypothesis entry of each query
        q_pair = pair_first[h_sent][q] + (np.arange(q.size) - (np.cumsum(rep) - rep)[q])
        pos = np.searchsorted(ent_key, pair_ref[q_pair] * G + h_gram[q])
        pos = np.minimum(pos, ent_key.size - 1)
        hit = ent_key[pos] == pair_ref[q_pair] * G + h_gram[q]
        q, q_pair, pos = q[hit], q_pair[hit], pos[hit]
        w_r = w[pos]
        contrib = np.minimum(h_w[q], w_r) * w_r  # the hypothesis weight clipped to the ref's
        dot = np.bincount(q_pair * n + ent_order[:E_h][q], weights=contrib, minlength=P * n)
        dot = dot.reshape(P, n).astype(np.float64, copy=False)  # int64 when nothing hit

        # cosine (0 where a norm is 0: then the dot product is 0 too), length penalty, mean
        denom = norm[pair_hyp] * norm[pair_ref]  # (P, n)
        cos = np.divide(dot, denom, out=np.zeros_like(dot), where=denom != 0)
        delta = (length[pair_hyp] - length[pair_ref]).astype(np.float64)
        penalty = np.exp(-(delta**2) / (2.0 * self.sigma**2))  # (P,)
        per_hyp = np.bincount(pair_hyp, weights=cos.sum(1) * penalty, minlength=H)
        return 10.0 * per_hyp / (n * hyp_nref)

    def corpus_score(
        self,
        results: Mapping[Hashable, Caption],
        references: Mapping[Hashable, Sequence[Caption]],
    ) -> tuple[float, dict[Hashable, float]]:
        """The mean CIDEr-D over the ids of ``results`` and each id's score.

        Without ``corpus_refs`` the df comes from the references of those ids, as in
        ``pycocoevalcap.cider.Cider().compute_score`` (and ``fastcap.metrics.caption_metrics``).
        """
        if not results:
            raise ValueError("CiderD.corpus_score: `results` is empty; nothing to score")
        ids = list(results)
        missing = [k for k in ids if k not in references]
        if missing:
            raise KeyError(f"CiderD.corpus_score: no references for ids {missing[:5]}")
        s = self.score([results[k] for k in ids], [references[k] for k in ids])
        return float(s.mean()), dict(zip(ids, s.tolist()))


def cider_d(
    results: Mapping[Hashable, Caption],
    references: Mapping[Hashable, Sequence[Caption]],
    *,
    n: int = 4,
    sigma: float = 6.0,
    tokenize: Callable[[str], str | Sequence[str]] | None = simple_tokenize,
) -> tuple[float, dict[Hashable, float]]:
    """Corpus CIDEr-D with the df from the references of the ids in ``results``: the value of
    ``Cider().compute_score`` (pycocoevalcap) on the same tokenised input. Returns the mean and
    each id's score."""
    return CiderD(n=n, sigma=sigma, tokenize=tokenize).corpus_score(results, references)
