"""Caption decoding: greedy, beam search and nucleus sampling over one KV-cached decoding step.

The image keys/values of every cross-attention layer are projected once per image (repeated
once per sample of an image; beam search keeps one row per image, which all its beams attend
to, so reordering beams never moves them). Self-attention keys/values live in one preallocated
:class:`~fastcap.model.layers.KVCache` per layer, written in place one token a step. Rows whose
sequence has finished (eos) leave the batch at the next look (:data:`FINISH_CHECK_EVERY`): their
cache rows, image keys/values and prefixes are dropped, so they cost no further work and cannot
change the others. Their output keeps only padding after eos. No step reads a value on the host
except those looks.

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


RANGES = {
    "temperature": (1e-4, 1e4, "below, sampling is greedy; above, uniform"),
    "repetition_penalty": (0.01, 100.0, "1 disables"),
    "length_penalty": (-10.0, 10.0, "GNMT's alpha: 0.6 to 1 are usual"),
}


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
    length_penalty: float = 0.0,
    seed: int | None = None,
) -> None:
    """Raise ValueError with a one-line fix for any setting that cannot work: the one check of
    the CLI, :class:`fastcap.api.DecodeOptions` (the Python API) and fastcap-serve. The float
    ranges (:data:`RANGES`) keep every step finite in fp32 (the overflows they stop: logits /
    1e-40, ((5 + len) / 6) ** 1e4): logits / temperature (x1e4 at most) or / the repetition
    penalty (x100), and GNMT's ((5 + len) / 6) ** alpha (|alpha| <= 10: under 1e23 for 1,000
    tokens)."""
    for name, v in (("temperature", temperature), ("repetition_penalty", repetition_penalty),
                    ("length_penalty", length_penalty)):  # fmt: skip
        lo, hi, why = RANGES[name]
        if not lo <= v <= hi:  # NaN too
            raise ValueError(f"{name} must be in [{lo:g}, {hi:g}] ({why}), got {v}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64 - 1], got {seed}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if min_new_tokens < 0 or (max_new_tokens is not None and min_new_tokens > max_new_tokens):
        raise ValueError(
            f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
        )
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


# ---------------------------------------------------------------------- per-row random streams
_M64 = 2**64


def _signed(x: int) -> int:
    x %= _M64
    return x - _M64 if x >= 2**63 else x


_GAMMA = 0x9E3779B97F4A7C15  # splitmix64 (Steele et al. 2014), as in java.util.SplittableRandom
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def row_uniforms(seeds: Tensor, t: int) -> Tensor:
    """(R,) int64 seeds, step t -> (R,) float64 uniforms in [0, 1): splitmix64's t-th output
    of the stream each seed starts, computed on the seeds' device (int64 arithmetic wraps), so
    a row's draws depend on its seed and the step alone."""
    z = seeds + _signed((t + 1) * _GAMMA)
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 11).double() * 2.0**-53


def derive_seeds(seed: int, n: int) -> list[int]:
    """Seeds of images 0..n-1 of a request seeded ``seed``: each from (seed, index) alone, in
    [0, 2**63), so image i of a request draws the same whatever batch it is decoded in."""
    import hashlib

    return [
        int.from_bytes(hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=8).digest(), "big") >> 1
        for i in range(n)
    ]


# ---------------------------------------------------------------------- the shared step
# How often, in steps, the decoders look for rows (greedy, sampling) or images (beam) that have
# finished, by device type. Each look reads a flag on the host: free on a CPU, a stall of the
# queue on a GPU. Between looks finished rows stay in the batch, masked (their tokens pad, their
# scores and hypotheses frozen), so the tokens do not depend on it (only the batch the matmuls
# see does); sampling's draws do, as finished rows still draw.
FINISH_CHECK_EVERY = {"cpu": 1}
DEFAULT_FINISH_CHECK_EVERY = 8


def _check_every(device: torch.device) -> int:
    return FINISH_CHECK_EVERY.get(device.type, DEFAULT_FINISH_CHECK_EVERY)


def _start(model, images: Tensor | None, image_tokens: Tensor | None, repeat: int):
    """Encode images once (unless their tokens are given) -> (image kv, B, device); the kv
    repeated ``repeat`` times per image (samples of one image, which finish one by one)."""
    if image_tokens is None:
        if images is None:
            raise ValueError("give images (B, 3, S, S) or image_tokens (B, N, d)")
        image_tokens, _ = model.encode_image(images)  # uint8 or float: the encoder casts
    # contiguous once: every step reads them, strided reads cost more
    img_kv = [(k.contiguous(), v.contiguous()) for k, v in model.image_kv(image_tokens)]
    if repeat > 1:
        img_kv = [
            (k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in img_kv
        ]
    return img_kv, image_tokens.shape[0], image_tokens.device


def _select(img_kv, idx: Tensor):
    """Keep rows ``idx`` of the image keys/values of every cross-attention layer."""
    return [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in img_kv]


def _next_logits(model, seq: Tensor, img_kv, cache) -> Tensor:
    """seq (R, t) = bos + generated so far -> fp32 logits (R, V) of the next token.

    With a cache only the newest token is fed (the cache holds the other t - 1 positions);
    without one the whole prefix is recomputed (the baseline the cache is measured against).
    """
    if cache is None:
        R, t = seq.shape
        h, _, _ = model.decode(
            seq, torch.full((R,), t, dtype=torch.long, device=seq.device), img_kv
        )
    else:
        h, _, _ = model.decode(seq[:, -1:], None, img_kv, cache)
    return model.logits(h[:, -1])


def _bans(cfg, V: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(V,) bool masks of the tokens banned at every step (pad, bos) and of those banned before
    ``min_new_tokens`` (also eos): built once per call, applied with one ``masked_fill``."""
    always = torch.zeros(V, dtype=torch.bool, device=device)
    always[[cfg.pad_id, cfg.bos_id]] = True
    early = always.clone()
    early[cfg.eos_id] = True
    return always, early


def _log_probs(
    logits: Tensor,
    seq: Tensor,
    step: int | Tensor,
    ctl: _Controls,
    cfg,
    bans: tuple[Tensor, Tensor],
) -> Tensor:
    """The processing chain of the module docstring: (R, V) logits -> (R, V) log-probs;
    ``seq`` (R, t) bos + the tokens so far, ``bans`` from :func:`_bans`; ``step`` may be a
    (1,) device tensor (static decoding)."""
    logits = logits.float()
    if ctl.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits.clone(), seq[:, 1:], ctl.repetition_penalty)
    if ctl.temperature != 1.0:
        logits = logits / ctl.temperature
    free = logits.log_softmax(-1)
    if isinstance(step, Tensor):  # static decoding: the step is on the device
        ban = torch.where(step < ctl.min_new_tokens, bans[1], bans[0])
    else:
        ban = bans[int(step < ctl.min_new_tokens)]
    logp = free.masked_fill(ban, NEG_INF)
    if ctl.no_repeat_ngram_size:
        ban_repeated_ngrams(logp, seq, ctl.no_repeat_ngram_size)
    # a row with every token banned may still end: eos at the probability it had
    # (no host sync: this runs every step)
    dead = torch.isinf(logp).all(-1)
    eos = cfg.eos_id
    logp[:, eos] = torch.where(dead, free[:, eos], logp[:, eos])
    return logp


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
    fixed_length: bool = False,
) -> Generated:
    cfg = model.cfg
    T = ctl.max_new_tokens
    img_kv, n_images, dev = _start(model, images, image_tokens, repeat)
    B = n_images * repeat  # rows: the samples of each image are adjacent
    cache = model.decoder.new_cache(T, dev) if use_cache else None
    bans = _bans(cfg, cfg.vocab_size, dev)
    # fixed_length: never look, so every call runs all T steps on all rows
    every = T + 1 if fixed_length else _check_every(dev)
    # results, by original row
    out = torch.full((B, T), cfg.pad_id, dtype=torch.long, device=dev)
    scores = torch.zeros(B, device=dev)
    lens = torch.full((B,), T, dtype=torch.long, device=dev)
    step_logits = None
    if output_logits:
        step_logits = torch.full((B, T, cfg.vocab_size), float("nan"), device=dev)
    # the rows still in the batch: original row, bos + tokens (pad after eos), summed log-probs,
    # length, finished (masked until the next look)
    rows = torch.arange(B, device=dev)
    seq = torch.full((B, T + 1), cfg.pad_id, dtype=torch.long, device=dev)
    seq[:, 0] = cfg.bos_id
    score = torch.zeros(B, device=dev)
    ends = torch.full((B,), T, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(T):
        logits = _next_logits(model, seq[:, : t + 1], img_kv, cache)
        if step_logits is not None:
            step_logits[rows, t] = logits.masked_fill(done[:, None], float("nan"))
        logp = _log_probs(logits, seq[:, : t + 1], t, ctl, cfg, bans)
        nxt = pick(logp, rows, t).masked_fill(done, cfg.pad_id)  # (R,)
        score += logp.gather(1, nxt[:, None]).squeeze(1).masked_fill(done, 0.0)
        seq[:, t + 1] = nxt
        fin = nxt == cfg.eos_id  # finished rows hold pad: these end now
        ends.masked_fill_(fin, t + 1)
        done |= fin
        if t + 1 == T or (t + 1) % every or not bool(done.any()):
            continue
        # finished rows leave the batch: their results go out, their cache rows are dropped
        gone = done.nonzero().squeeze(1)
        out[rows[gone]], scores[rows[gone]], lens[rows[gone]] = (
            seq[gone, 1:],
            score[gone],
            ends[gone],
        )
        keep = (~done).nonzero().squeeze(1)
        rows, seq, score, ends, done = rows[keep], seq[keep], score[keep], ends[keep], done[keep]
        if keep.numel() == 0:
            break
        img_kv = _select(img_kv, keep)
        for c in cache or ():
            c.select_rows(keep)
    out[rows], scores[rows], lens[rows] = seq[:, 1:], score, ends
    used = int(lens.max())
    if step_logits is not None:
        step_logits = step_logits[:, :used]
    return Generated(out[:, :used], lens, scores, step_logits)


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
    static: bool = False,
    fixed_length: bool = False,
) -> Generated:
    """Greedy decoding of images (B, 3, S, S) (uint8: the model normalises) -> Generated.

    ``max_new_tokens`` defaults to the model's ``max_len - 1``. ``use_cache=False`` recomputes
    the whole prefix at every step (same result, the baseline for benchmarks).
    ``output_logits`` also returns the model's logits (B, T, V) of every step.
    ``image_tokens`` (B, N, d) from ``model.encode_image`` skips the encoder (``images`` may
    then be None); the same holds for :func:`beam` and :func:`sample`.

    ``fixed_length`` (also :func:`sample`): run all ``max_new_tokens`` steps on every row,
    finished rows masked and never dropped, so the decoder is called the same number of times
    whatever the captions: what decoding inside a ZeRO-3 forward over several ranks needs,
    where every module call may gather parameters collectively (SCST). The same tokens.

    ``static``: every step runs the same kernels on the same buffers (a full-length cache with
    a length mask, the position on the device, finished rows kept and masked, no host read
    but the look for the end every few steps); on CUDA one step is captured as a CUDA graph
    and replayed. The same tokens; no repetition penalty, n-gram ban, logits output or MoE
    decoder. Also :func:`beam`.
    """
    max_new = max_new_tokens or model.cfg.max_len - 1
    check_controls(
        max_new_tokens=max_new,
        min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    ctl = _Controls(max_new, min_new_tokens, repetition_penalty, no_repeat_ngram_size)
    if static:
        _check_static(ctl, output_logits)
        img_kv, B, dev = _start(model, images, image_tokens, 1)
        return _greedy_static(model, img_kv, B, dev, ctl)
    return _decode_one_per_image(
        model,
        images,
        image_tokens,
        lambda lp, rows, t: lp.argmax(-1),
        ctl,
        use_cache=use_cache,
        output_logits=output_logits,
        fixed_length=fixed_length,
    )


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
    row_seeds: Tensor | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    use_cache: bool = True,
    output_logits: bool = False,
    image_tokens: Tensor | None = None,
    fixed_length: bool = False,
) -> Generated:
    """Top-k / nucleus sampling at ``temperature`` -> Generated with B * num_return_sequences
    rows (image-major: the samples of image 0 first).

    Reproducible with ``seed`` (a generator on the images' device is made from it) or an
    explicit ``generator`` on that device: one stream of draws for the whole batch, so a row's
    draws depend on the other rows. ``row_seeds`` (B,) int64 instead gives each image its own
    stream (:func:`row_uniforms`: counter-based, on the device), so an image's caption depends
    only on its seed and its pixels, not on its batch (what fastcap-serve needs); its samples
    j > 0 draw from ``row_seeds + j``. Scores are summed log-probs at the temperature, before
    the top-k/top-p filter.
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
        seed=seed,
    )
    if generator is None and seed is not None:
        dev = (images if image_tokens is None else image_tokens).device
        generator = torch.Generator(device=dev).manual_seed(seed)
    ctl = _Controls(max_new, min_new_tokens, repetition_penalty, no_repeat_ngram_size, temperature)
    R = num_return_sequences
    if row_seeds is not None:  # (B * R,) by row: image-major, sample j of image b at b * R + j
        row_seeds = row_seeds.to(torch.long).repeat_interleave(R)
        row_seeds = row_seeds + torch.arange(R, device=row_seeds.device).repeat(len(row_seeds) // R)

    def pick(logp: Tensor, rows: Tensor, t: int) -> Tensor:
        probs = top_k_top_p_filter(logp, top_k, top_p).softmax(-1)
        if row_seeds is None:
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        # inverse CDF at each row's own uniform; never a token of zero probability
        cdf = probs.double().cumsum(-1)
        u = row_uniforms(row_seeds.to(rows.device)[rows], t) * cdf[:, -1]
        nxt = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
        V = probs.shape[1]
        last = V - 1 - (probs > 0).flip(-1).int().argmax(-1)
        return torch.minimum(nxt, last)

    return _decode_one_per_image(
        model,
        images,
        image_tokens,
        pick,
        ctl,
        use_cache=use_cache,
        output_logits=output_logits,
        repeat=num_return_sequences,
        fixed_length=fixed_length,
    )


# Training objectives that decode inside the engine's forward (SCST, fastcap.train.scst) take
# these twins: no_grad rather than inference_mode, so that parameters ZeRO-3 gathers during the
# decoding stay ordinary tensors, usable by the differentiable pass that follows.
greedy_no_grad = torch.no_grad()(greedy)
sample_no_grad = torch.no_grad()(sample)
greedy = torch.inference_mode()(greedy)
sample = torch.inference_mode()(sample)


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
    static: bool = False,
) -> Generated:
    """Beam search, batched over images and beams at once -> Generated with
    B * num_return_sequences rows (image-major, best first); scores are length-penalised.

    Each step takes the best 2K candidates of each image (K = num_beams); those ending in eos
    within the first K ranks become finished hypotheses (at most K are kept per image), the
    best K others continue. At ``max_new_tokens`` the candidates of the last step are finished
    as they stand. An image stops searching when ``early_stopping`` and it has K finished
    hypotheses; without ``early_stopping`` only when no live beam can still beat its worst
    finished one (an exact bound: log-probs only fall, and lp is monotone in the length).
    With num_beams=1 this is greedy decoding. ``static``: see :func:`greedy`.
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
        length_penalty=length_penalty,
    )
    ctl = _Controls(max_new, min_new_tokens, repetition_penalty, no_repeat_ngram_size)
    K, T, alpha = num_beams, max_new, length_penalty
    if static:
        _check_static(ctl)
        img_kv, B, dev = _start(model, images, image_tokens, 1)
        return _beam_static(model, img_kv, B, dev, ctl, K, alpha, early_stopping,
                            num_return_sequences)  # fmt: skip
    # one row of image keys/values per image: its K beams share it (grouped cross-attention),
    # so beam reordering never moves them
    img_kv, B, dev = _start(model, images, image_tokens, 1)
    cache = model.decoder.new_cache(T, dev) if use_cache else None
    bans = _bans(cfg, cfg.vocab_size, dev)
    every = _check_every(dev)
    # results, by original image: finished hypotheses best first (penalised score, tokens, length)
    out_s = torch.full((B, K), NEG_INF, device=dev)
    out_tok = torch.full((B, K, T), cfg.pad_id, dtype=torch.long, device=dev)
    out_len = torch.zeros((B, K), dtype=torch.long, device=dev)
    # the images still searching (A of them): original image, finished hypotheses, done (frozen
    # until the next look), live beams (only beam 0 at the start: all beams are equal), and the
    # beams' bos + tokens (A * K rows, pad after the current step)
    img = torch.arange(B, device=dev)
    fin_s, fin_tok, fin_len = out_s.clone(), out_tok.clone(), out_len.clone()
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    beam_s = torch.full((B, K), NEG_INF, device=dev)
    beam_s[:, 0] = 0.0
    seq = torch.full((B * K, T + 1), cfg.pad_id, dtype=torch.long, device=dev)
    seq[:, 0] = cfg.bos_id
    first_k = torch.arange(2 * K, device=dev) < K
    base = torch.arange(B, device=dev)[:, None] * K  # (A, 1) first row of each image
    for t in range(T):
        A = beam_s.shape[0]
        logits = _next_logits(model, seq[:, : t + 1], img_kv, cache)
        logp = _log_probs(logits, seq[:, : t + 1], t, ctl, cfg, bans)
        V = logp.shape[1]
        cand = (beam_s.reshape(-1, 1) + logp).view(A, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)  # (A, C), best first
        C = top_s.shape[1]
        rows = top_i // V + base  # row of seq it extends
        tok = top_i % V
        is_eos = tok == cfg.eos_id
        last = t == T - 1
        live = torch.isfinite(top_s) & first_k[:C] & ~done[:, None]
        finish = (is_eos | last) & live
        # merge the new finished hypotheses into the kept K of each image
        L = t + 1
        new_s = torch.where(finish, top_s / length_penalty_factor(L, alpha), NEG_INF)
        new_tok = seq.index_select(0, rows.flatten())[:, 1:].view(A, C, T)
        new_tok[:, :, L - 1] = tok
        best_s, best_i = torch.cat([fin_s, new_s], dim=1).topk(K, dim=1)
        best_tok = torch.cat([fin_tok, new_tok], dim=1).gather(
            1, best_i[:, :, None].expand(-1, -1, T)
        )
        best_len = torch.cat([fin_len, torch.full_like(tok, L)], dim=1).gather(1, best_i)
        fin_s = torch.where(done[:, None], fin_s, best_s)
        fin_tok = torch.where(done[:, None, None], fin_tok, best_tok)
        fin_len = torch.where(done[:, None], fin_len, best_len)
        if last:
            break
        # the best K candidates that do not end in eos continue (there are always K: each
        # beam contributes at most one eos to the 2K)
        order = torch.sort(is_eos.int(), dim=1, stable=True).indices[:, :K]
        beam_s = top_s.gather(1, order)
        nxt_rows = rows.gather(1, order).flatten()
        seq = seq.index_select(0, nxt_rows)
        seq[:, t + 1] = tok.gather(1, order).flatten()
        for c in cache or ():
            c.select_rows(nxt_rows)
        # which images are done
        n_fin = torch.isfinite(fin_s).sum(1)
        best_live = beam_s.max(1).values
        if early_stopping:
            now = n_fin >= K
        else:
            horizon = T if alpha > 0 else L + 1
            bound = best_live / length_penalty_factor(horizon, alpha)
            now = (n_fin >= K) & (fin_s[:, -1] >= bound)
        done |= now | ~torch.isfinite(best_live)
        if (t + 1) % every or not bool(done.any()):
            continue
        # done images leave the search: their hypotheses go out, their rows are dropped
        gone = done.nonzero().squeeze(1)
        out_s[img[gone]], out_tok[img[gone]], out_len[img[gone]] = (
            fin_s[gone],
            fin_tok[gone],
            fin_len[gone],
        )
        keep = (~done).nonzero().squeeze(1)
        img, fin_s, fin_tok, fin_len = img[keep], fin_s[keep], fin_tok[keep], fin_len[keep]
        if keep.numel() == 0:
            break
        done, beam_s = done[keep], beam_s[keep]
        keep_rows = (keep[:, None] * K + torch.arange(K, device=dev)).flatten()
        seq = seq[keep_rows]
        img_kv = _select(img_kv, keep)
        for c in cache or ():
            c.select_rows(keep_rows)
        base = base[: keep.numel()]
    out_s[img], out_tok[img], out_len[img] = fin_s, fin_tok, fin_len
    R = num_return_sequences
    lens = out_len[:, :R].reshape(-1)
    used = int(lens.max())
    return Generated(out_tok[:, :R, :used].reshape(B * R, used), lens, out_s[:, :R].reshape(-1))


# ---------------------------------------------------------------------- static decoding
def _check_static(ctl: _Controls, output_logits: bool = False) -> None:
    if ctl.repetition_penalty != 1.0 or ctl.no_repeat_ngram_size or output_logits:
        raise ValueError(
            "static=True decodes with min/max_new_tokens only (the history-dependent "
            "processors need the prefix length on the host): drop repetition_penalty, "
            "no_repeat_ngram_size and output_logits, or use static=False"
        )


def _run_static(step, T: int, dev: torch.device, finished) -> None:
    """Run ``step`` (which advances the device position itself) up to T times.

    On CUDA the first step runs eagerly on a side stream (lazy initialisation, Triton
    compilation and autotuning, cuBLAS workspaces), the second is captured as a CUDA graph, and
    that graph is replayed for every later step; elsewhere each step runs eagerly.
    ``finished()`` (0-d bool) is read every :func:`_check_every` steps, a host
    synchronisation, to stop once every row is done.
    """
    every = _check_every(dev)
    graph = None
    for t in range(T):
        if t and t % every == 0 and bool(finished()):
            return
        if dev.type != "cuda":
            step()
        elif t == 0:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(dev).wait_stream(side)
        else:
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()  # recorded, not run
            graph.replay()


def _greedy_static(model, img_kv, B: int, dev: torch.device, ctl: _Controls) -> Generated:
    """Greedy decoding with every step the same: finished rows stay, masked (see ``static``
    in :func:`greedy`)."""
    cfg = model.cfg
    T = ctl.max_new_tokens
    cache = model.decoder.new_cache(T, dev, static=True)
    pos = cache[0].pos  # (1,) the position fed this step
    bans = _bans(cfg, cfg.vocab_size, dev)
    seq = torch.full((B, T + 1), cfg.pad_id, dtype=torch.long, device=dev)
    seq[:, 0] = cfg.bos_id
    score = torch.zeros(B, device=dev)
    ends = torch.full((B,), T, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)

    def step():
        logits = _next_logits(model, seq.index_select(1, pos), img_kv, cache)
        logp = _log_probs(logits, seq, pos, ctl, cfg, bans)
        nxt = logp.argmax(-1).masked_fill(done, cfg.pad_id)
        score.add_(logp.gather(1, nxt[:, None]).squeeze(1).masked_fill(done, 0.0))
        seq.index_copy_(1, pos + 1, nxt[:, None])
        fin = nxt == cfg.eos_id
        ends.copy_(torch.where(fin, pos + 1, ends))
        done.logical_or_(fin)
        pos.add_(1)

    _run_static(step, T, dev, done.all)
    used = int(ends.max())
    return Generated(seq[:, 1 : used + 1], ends, score)


def _beam_static(
    model, img_kv, B: int, dev: torch.device, ctl: _Controls, K: int, alpha: float,
    early_stopping: bool, R: int,
) -> Generated:  # fmt: skip
    """:func:`beam` with every step the same: done images stay, frozen, and the position and
    length penalty live on the device. Same bookkeeping as the dynamic loop, on fixed buffers."""
    cfg = model.cfg
    T = ctl.max_new_tokens
    cache = model.decoder.new_cache(T, dev, static=True)
    pos = cache[0].pos
    bans = _bans(cfg, cfg.vocab_size, dev)
    V = cfg.vocab_size
    C = min(2 * K, K * V)
    fin_s = torch.full((B, K), NEG_INF, device=dev)
    fin_tok = torch.full((B, K, T), cfg.pad_id, dtype=torch.long, device=dev)
    fin_len = torch.zeros((B, K), dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    beam_s = torch.full((B, K), NEG_INF, device=dev)
    beam_s[:, 0] = 0.0
    seq = torch.full((B * K, T + 1), cfg.pad_id, dtype=torch.long, device=dev)
    seq[:, 0] = cfg.bos_id
    first_k = torch.arange(C, device=dev) < K
    base = torch.arange(B, device=dev)[:, None] * K

    def step():
        logits = _next_logits(model, seq.index_select(1, pos), img_kv, cache)
        logp = _log_probs(logits, seq, pos, ctl, cfg, bans)
        cand = (beam_s.reshape(-1, 1) + logp).view(B, K * V)
        top_s, top_i = cand.topk(C, dim=1)
        rows = top_i // V + base
        tok = top_i % V
        is_eos = tok == cfg.eos_id
        L = pos + 1  # (1,) tokens generated after this step
        live = torch.isfinite(top_s) & first_k & ~done[:, None]
        finish = (is_eos | (L == T)) & live
        # the length penalty in float64, as the dynamic loop's Python float
        lp = length_penalty_factor(L.double(), alpha).to(top_s.dtype)
        new_s = torch.where(finish, top_s / lp, NEG_INF)
        new_tok = seq.index_select(0, rows.flatten())[:, 1:].view(B, C, T)
        new_tok.index_copy_(2, pos, tok[:, :, None])
        best_s, best_i = torch.cat([fin_s, new_s], dim=1).topk(K, dim=1)
        best_tok = torch.cat([fin_tok, new_tok], dim=1).gather(
            1, best_i[:, :, None].expand(-1, -1, T)
        )
        best_len = torch.cat([fin_len, L.expand_as(tok)], dim=1).gather(1, best_i)
        fin_s.copy_(torch.where(done[:, None], fin_s, best_s))
        fin_tok.copy_(torch.where(done[:, None, None], fin_tok, best_tok))
        fin_len.copy_(torch.where(done[:, None], fin_len, best_len))
        order = torch.sort(is_eos.int(), dim=1, stable=True).indices[:, :K]
        beam_s.copy_(top_s.gather(1, order))
        nxt_rows = rows.gather(1, order).flatten()
        seq.copy_(seq.index_select(0, nxt_rows))
        seq.index_copy_(1, L, tok.gather(1, order).reshape(-1, 1))
        for c in cache:
            c.select_rows(nxt_rows)
        n_fin = torch.isfinite(fin_s).sum(1)
        best_live = beam_s.max(1).values
        if early_stopping:
            now = n_fin >= K
        else:
            horizon = torch.full_like(L, T) if alpha > 0 else L + 1
            bound = best_live / length_penalty_factor(horizon.double(), alpha).to(top_s.dtype)
            now = (n_fin >= K) & (fin_s[:, -1] >= bound)
        done.logical_or_(now | ~torch.isfinite(best_live))
        pos.add_(1)

    _run_static(step, T, dev, done.all)
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
