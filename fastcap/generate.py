"""Caption decoding: greedy, beam search and nucleus sampling over one KV-cached decoding step.

The image keys/values of every cross-attention layer are projected once per image (and, for
beam search, repeated once per beam); self-attention keys/values are cached per layer and
extended one token a step. Rows whose sequence has finished (eos) leave the batch: their cache
rows, image keys/values and prefixes are dropped, so they cost no further work and cannot change
the others. Their output keeps only padding after eos.

Per step, for every strategy, the next-token distribution is made in one order:

    fp32 logits -> repetition penalty (CTRL) -> / temperature (sample) -> log_softmax
    -> bans (pad and bos always; eos before ``min_new_tokens``; repeated n-grams) = log-probs

Scores are sums of those log-probs (the model's own log-probabilities when no penalty and no
temperature is set). Beam search ranks by ``sum / ((5 + len) / 6) ** length_penalty`` (GNMT),
``len`` counting the generated tokens with eos. Sampling draws from the log-probs after top-k
and top-p filtering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STRATEGIES = ("greedy", "beam", "sample")
NEG_INF = float("-inf")


@dataclass
class Generated:
    tokens: Tensor  # (N, T) generated ids after bos, eos included, pad after it
    lens: Tensor  # (N,) generated tokens up to and including eos (T if none)
    scores: Tensor  # (N,) greedy/sample: summed log-probs; beam: length-penalised
    step_logits: Tensor | None = None  # (N, T, V) fp32 model logits per step; NaN once done


# ---------------------------------------------------------------------- logits processors
def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019) on tokens already generated, in place.

    logits (R, V) fp32; history (R, t) token ids. A seen token's logit is divided by
    ``penalty`` when positive and multiplied by it when negative, so penalty > 1 always makes
    it less likely. Returns ``logits``.
    """
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter_(1, history, seen)


def ban_repeated_ngrams(logp: Tensor, history: Tensor, n: int) -> Tensor:
    """Set to -inf every token that would complete an n-gram already in ``history``, in place.

    logp (R, V); history (R, t) ids, bos included. Returns ``logp``.
    """
    R, t = history.shape
    if n <= 0 or t < n:
        return logp
    if n == 1:
        return logp.scatter_(1, history, NEG_INF)
    grams = history.unfold(1, n, 1)  # (R, t - n + 1, n)
    prefix = history[:, t - n + 1 :]  # (R, n - 1): the n-gram the next token would complete
    hit = (grams[:, :, :-1] == prefix[:, None, :]).all(-1)  # (R, t - n + 1)
    V = logp.shape[1]
    # misses write into a spare column V, which is cut off again
    banned = torch.where(hit, grams[:, :, -1], V)
    ext = torch.cat([logp, logp.new_zeros(R, 1)], dim=1)
    ext.scatter_(1, banned, NEG_INF)
    logp.copy_(ext[:, :V])
    return logp


def top_k_top_p_filter(logp: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the ``top_k`` most likely tokens and the nucleus: the fewest most likely tokens
    whose probability reaches ``top_p`` (Holtzman et al. 2020); the rest become -inf.

    logp (R, V) log-probabilities (or logits); 0 / 1.0 disable either filter. The most likely
    token always survives. Returns a new tensor.
    """
    out = logp.clone()
    V = out.shape[1]
    if 0 < top_k < V:
        kth = out.topk(top_k, dim=1).values[:, -1:]
        out = out.masked_fill(out < kth, NEG_INF)
    if top_p < 1.0:
        sorted_lp, order = out.sort(dim=1, descending=True)
        probs = sorted_lp.softmax(dim=1)
        before = probs.cumsum(dim=1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        out = out.masked_fill(drop, NEG_INF)
    return out


@dataclass
class _Controls:
    """What every strategy shares; validated once by :func:`check_controls`."""

    max_new_tokens: int
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0


def check_controls(
    *,
    strategy: str = "greedy",
    max_new_tokens: int | None = 1,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    top_p: float = 1.0,
    top_k: int = 0,
    temperature: float = 1.0,
) -> None:
    """Raise ValueError with a one-line fix for any setting that cannot work."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if min_new_tokens < 0 or (max_new_tokens is not None and min_new_tokens > max_new_tokens):
        raise ValueError(
            f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
        )
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 disables), got {repetition_penalty}")
    if no_repeat_ngram_size < 0:
        raise ValueError(
            f"no_repeat_ngram_size must be >= 0 (0 disables), got {no_repeat_ngram_size}"
        )
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams and strategy == "beam":
        raise ValueError(
            f"num_return_sequences must be in [1, num_beams={num_beams}], "
            f"got {num_return_sequences}"
        )
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables), got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy for the limit 0), got {temperature}")


# ---------------------------------------------------------------------- the shared step
def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _start(model, images: Tensor | None, image_tokens: Tensor | None, repeat: int):
    """Encode images once (unless their tokens are given) -> (image kv, B, device); the kv
    repeated ``repeat`` times per image (beams)."""
    if image_tokens is None:
        if images is None:
            raise ValueError("give images (B, 3, S, S) or image_tokens (B, N, d)")
        image_tokens, _ = model.encode_image(images.to(_model_dtype(model)))
    img_kv = model.image_kv(image_tokens)
    if repeat > 1:
        img_kv = [
            (k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in img_kv
        ]
    return img_kv, image_tokens.shape[0], image_tokens.device


def _rows(img_kv, cache, idx: Tensor):
    """Keep (or reorder) batch rows ``idx`` of the image kv and the self-attention cache."""
    img_kv = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in img_kv]
    if cache is not None:
        for c in cache:
            if "k" in c:
                c["k"], c["v"] = c["k"].index_select(0, idx), c["v"].index_select(0, idx)
    return img_kv


def _next_logits(model, seq: Tensor, img_kv, cache) -> Tensor:
    """seq (R, t) = bos + generated so far -> fp32 logits (R, V) of the next token.

    With a cache only the newest token is fed (the cache holds the other t - 1 positions);
    without one the whole prefix is recomputed (the baseline the cache is measured against).
    """
    R, t = seq.shape
    kv_lens = torch.full((R,), t, dtype=torch.long, device=seq.device)
    tokens = seq if cache is None else seq[:, -1:]
    h, _, _ = model.decode(tokens, kv_lens, img_kv, cache)
    return model.logits(h[:, -1])


def _log_probs(logits: Tensor, seq: Tensor, step: int, ctl: _Controls, cfg) -> Tensor:
    """The processing chain of the module docstring: (R, V) logits -> (R, V) log-probs."""
    logits = apply_repetition_penalty(logits.float().clone(), seq[:, 1:], ctl.repetition_penalty)
    if ctl.temperature != 1.0:
        logits = logits / ctl.temperature
    logp = logits.log_softmax(-1)
    logp[:, [cfg.pad_id, cfg.bos_id]] = NEG_INF
    if step < ctl.min_new_tokens:
        logp[:, cfg.eos_id] = NEG_INF
    if ctl.no_repeat_ngram_size:
        ban_repeated_ngrams(logp, seq, ctl.no_repeat_ngram_size)
    # a row with every token banned may still end: eos at the probability it had
    # (no host sync: this runs every step)
    dead = torch.isinf(logp).all(-1, keepdim=True)
    is_eos = torch.arange(logp.shape[1], device=logp.device) == cfg.eos_id
    return torch.where(dead & is_eos, logits.log_softmax(-1), logp)


# ---------------------------------------------------------------------- greedy and sampling
def _decode_one_per_image(
    model,
    images: Tensor | None,
    image_tokens: Tensor | None,
    pick,
    ctl: _Controls,
    *,
    use_cache: bool,
    output_logits: bool,
    repeat: int = 1,
) -> Generated:
    cfg = model.cfg
    T = ctl.max_new_tokens
    img_kv, n_images, dev = _start(model, images, image_tokens, repeat)
    B = n_images * repeat  # rows: the samples of each image are adjacent
    cache = [{} for _ in model.decoder.layers] if use_cache else None
    out = torch.full((B, T), cfg.pad_id, dtype=torch.long, device=dev)
    scores = torch.zeros(B, device=dev)
    lens = torch.full((B,), T, dtype=torch.long, device=dev)
    step_logits = None
    if output_logits:
        step_logits = torch.full((B, T, cfg.vocab_size), float("nan"), device=dev)
    active = torch.arange(B, device=dev)  # original rows still decoding
    seq = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=dev)
    for t in range(T):
        logits = _next_logits(model, seq, img_kv, cache)
        if step_logits is not None:
            step_logits[active, t] = logits
        logp = _log_probs(logits, seq, t, ctl, cfg)
        nxt = pick(logp)  # (A,)
        scores[active] += logp.gather(1, nxt[:, None]).squeeze(1)
        out[active, t] = nxt
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        fin = nxt == cfg.eos_id
        if bool(fin.any()):
            lens[active[fin]] = t + 1
            keep = (~fin).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active, seq = active[keep], seq[keep]
            img_kv = _rows(img_kv, cache, keep)
    used = int(lens.max())
    if step_logits is not None:
        step_logits = step_logits[:, :used]
    return Generated(out[:, :used], lens, scores, step_logits)


@torch.inference_mode()
def greedy(
    model,
    images: Tensor,
    *,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    use_cache: bool = True,
    output_logits: bool = False,
    image_tokens: Tensor | None = None,
) -> Generated:
    """Greedy decoding of normalised images (B, 3, S, S) -> Generated with B rows.

    ``max_new_tokens`` defaults to the model's ``max_len - 1``. ``use_cache=False`` recomputes
    the whole prefix at every step (same result, the baseline for benchmarks).
    ``output_logits`` also returns the model's logits (B, T, V) of every step.
    ``image_tokens`` (B, N, d) from ``model.encode_image`` skips the encoder (``images`` may
    then be None); the same holds for :func:`beam` and :func:`sample`.
    """
    max_new = max_new_tokens or model.cfg.max_len - 1
    check_controls(
        max_new_tokens=max_new,
        min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    ctl = _Controls(max_new, min_new_tokens, repetition_penalty, no_repeat_ngram_size)
    return _decode_one_per_image(
        model,
        images,
        image_tokens,
        lambda lp: lp.argmax(-1),
        ctl,
        use_cache=use_cache,
        output_logits=output_logits,
    )


@torch.inference_mode()
def sample(
    model,
    images: Tensor,
    *,
    top_p: float = 0.9,
    top_k: int = 0,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    use_cache: bool = True,
    output_logits: bool = False,
    image_tokens: Tensor | None = None,
) -> Generated:
    """Top-k / nucleus sampling at ``temperature`` -> Generated with B * num_return_sequences
    rows (image-major: the samples of image 0 first).

    Reproducible with ``seed`` (a generator on the images' device is made from it) or an
    explicit ``generator`` on that device. Scores are summed log-probs at the temperature,
    before the top-k/top-p filter.
    """
    max_new = max_new_tokens or model.cfg.max_len - 1
    check_controls(
        strategy="sample",
        max_new_tokens=max_new,
        min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        num_return_sequences=num_return_sequences,
        top_p=top_p,
        top_k=top_k,
        temperature=temperature,
    )
    if generator is None and seed is not None:
        dev = (images if image_tokens is None else image_tokens).device
        generator = torch.Generator(device=dev).manual_seed(seed)
    ctl = _Controls(max_new, min_new_tokens, repetition_penalty, no_repeat_ngram_size, temperature)

    def pick(logp: Tensor) -> Tensor:
        probs = top_k_top_p_filter(logp, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _decode_one_per_image(
        model,
        images,
        image_tokens,
        pick,
        ctl,
        use_cache=use_cache,
        output_logits=output_logits,
        repeat=num_return_sequences,
    )


# ---------------------------------------------------------------------- beam search
def length_penalty_factor(length: Tensor | int, alpha: float) -> Tensor | float:
    """GNMT's lp(len) = ((5 + len) / 6) ** alpha (Wu et al. 2016); scores are sum / lp."""
    return ((5 + length) / 6) ** alpha


@torch.inference_mode()
def beam(
    model,
    images: Tensor,
    *,
    num_beams: int = 3,
    length_penalty: float = 0.6,
    early_stopping: bool = True,
    num_return_sequences: int = 1,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    use_cache: bool = True,
    image_tokens: Tensor | None = None,
) -> Generated:
    """Beam search, batched over images and beams at once -> Generated with
    B * num_return_sequences rows (image-major, best first); scores are length-penalised.

    Each step takes the best 2K candidates of each image (K = num_beams); those ending in eos
    within the first K ranks become finished hypotheses (at most K are kept per image), the
    best K others continue. At ``max_new_tokens`` the candidates of the last step are finished
    as they stand. An image stops searching when ``early_stopping`` and it has K finished
    hypotheses; without ``early_stopping`` only when no live beam can still beat its worst
    finished one (an exact bound: log-probs only fall, and lp is monotone in the length).
    With num_beams=1 this is greedy decoding.
    """
    cfg = model.cfg
    max_new = max_new_tokens or cfg.max_len - 1
    check_controls(
        strategy="beam",
        max_new_tokens=max_new,
        min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
    )
    ctl = _Controls(max_new, min_new_tokens, repetition_penalty, no_repeat_ngram_size)
    K, T, alpha = num_beams, max_new, length_penalty
    img_kv, B, dev = _start(model, images, image_tokens, K)
    cache = [{} for _ in model.decoder.layers] if use_cache else None
    # finished hypotheses of every image, best first: penalised score, tokens, length
    fin_s = torch.full((B, K), NEG_INF, device=dev)
    fin_tok = torch.full((B, K, T), cfg.pad_id, dtype=torch.long, device=dev)
    fin_len = torch.zeros((B, K), dtype=torch.long, device=dev)
    active = torch.arange(B, device=dev)  # images still searching
    # live beams of the active images: only beam 0 is live at the start (all beams equal)
    beam_s = torch.full((B, K), NEG_INF, device=dev)
    beam_s[:, 0] = 0.0
    seq = torch.full((B * K, 1), cfg.bos_id, dtype=torch.long, device=dev)
    rank = torch.arange(2 * K, device=dev)
    for t in range(T):
        A = active.numel()
        logp = _log_probs(_next_logits(model, seq, img_kv, cache), seq, t, ctl, cfg)
        V = logp.shape[1]
        cand = (beam_s.reshape(-1, 1) + logp).view(A, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)  # (A, 2K), best first
        rows = top_i // V + torch.arange(A, device=dev)[:, None] * K  # row of seq it extends
        tok = top_i % V
        live = torch.isfinite(top_s)
        is_eos = tok == cfg.eos_id
        last = t == T - 1
        finish = (is_eos | last) & live & (rank[None, : top_s.shape[1]] < K)
        # merge the new finished hypotheses into the kept K of each image
        L = t + 1
        new_s = torch.where(finish, top_s / length_penalty_factor(L, alpha), NEG_INF)
        new_tok = torch.full((A, top_s.shape[1], T), cfg.pad_id, dtype=torch.long, device=dev)
        if L > 1:
            new_tok[:, :, : L - 1] = seq[rows.flatten(), 1:].view(A, -1, L - 1)
        new_tok[:, :, L - 1] = tok
        all_s = torch.cat([fin_s[active], new_s], dim=1)
        all_tok = torch.cat([fin_tok[active], new_tok], dim=1)
        all_len = torch.cat([fin_len[active], torch.full_like(tok, L)], dim=1)
        best_s, best_i = all_s.topk(K, dim=1)
        fin_s[active] = best_s
        fin_tok[active] = all_tok.gather(1, best_i[:, :, None].expand(-1, -1, T))
        fin_len[active] = all_len.gather(1, best_i)
        if last:
            break
        # the best K candidates that do not end in eos continue (there are always K: each
        # beam contributes at most one eos to the 2K)
        order = torch.sort(is_eos.int(), dim=1, stable=True).indices[:, :K]
        beam_s = top_s.gather(1, order)
        nxt_rows = rows.gather(1, order).flatten()
        seq = torch.cat([seq[nxt_rows], tok.gather(1, order).reshape(-1, 1)], dim=1)
        img_kv = _rows(img_kv, cache, nxt_rows)
        # which images are done
        n_fin = torch.isfinite(best_s).sum(1)
        best_live = beam_s.max(1).values
        if early_stopping:
            done = n_fin >= K
        else:
            horizon = T if alpha > 0 else L + 1
            bound = best_live / length_penalty_factor(horizon, alpha)
            done = (n_fin >= K) & (best_s[:, -1] >= bound)
        done |= ~torch.isfinite(best_live)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active, beam_s = active[keep], beam_s[keep]
            keep_rows = (keep[:, None] * K + torch.arange(K, device=dev)).flatten()
            seq = seq[keep_rows]
            img_kv = _rows(img_kv, cache, keep_rows)
    R = num_return_sequences
    lens = fin_len[:, :R].reshape(-1)
    used = int(lens.max())
    return Generated(fin_tok[:, :R, :used].reshape(B * R, used), lens, fin_s[:, :R].reshape(-1))


# ---------------------------------------------------------------------- one entry point
def generate(model, images: Tensor, *, strategy: str = "greedy", **kw) -> Generated:
    """Dispatch to :func:`greedy`, :func:`beam` or :func:`sample` by name."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return {"greedy": greedy, "beam": beam, "sample": sample}[strategy](model, images, **kw)


def decode_texts(tokenizer, gen: Generated) -> list[str]:
    return [tokenizer.decode(row[: int(n)].tolist()) for row, n in zip(gen.tokens, gen.lens)]
