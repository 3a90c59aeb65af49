"""Self-critical sequence training (SCST; Rennie et al. 2017): after cross-entropy, train on
the reward a caption earns, CIDEr-D against the image's references, with the REINFORCE
gradient and a baseline from the model itself.

One optimiser step, for B images of the batch:

1. encode the images (with gradient: the encoder learns from the reward too);
2. sample K captions per image with the model's own KV-cached decoding, no gradient
   (:func:`fastcap.generate.sample_no_grad`), and for ``baseline=greedy`` one greedy caption;
3. reward every sample: CIDEr-D against the image's references, with the document
   frequencies of the whole training split (computed once, as ruotianluo's
   ImageCaptioning.pytorch does with its ``coco-train-idxs`` file), on the host;
4. baseline: the mean reward of the image's *other* K - 1 samples ("new self-critical",
   Luo 2020) or the greedy caption's reward;
5. one teacher-forced pass over the samples gives log p(token) with gradient; the loss is
   -sum (r - b) log p over the sampled tokens (eos included), divided by their number.

All of it runs inside the engine's forward (:meth:`fastcap.model.Captioner.forward` calls the
objective there), where ZeRO-3 has the parameters at hand, so SCST shards like cross-entropy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fastcap.cider import CiderD
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.generate import Generated, greedy_no_grad, sample_no_grad
from fastcap.train import checkpoint as ckpt
from fastcap.train.config import ConfigError, TrainConfig
from fastcap.train.inputs import with_tokenizer


class CiderReward:
    """CIDEr-D of decoded token rows against the references of their images.

    Args:
        references: image id -> its reference captions (the training split's).
        tokenizer: decodes generated ids to text.
    """

    def __init__(self, references: dict[int, Sequence[str]], tokenizer):
        self.references, self.tokenizer = references, tokenizer
        # the idf of every training reference, counted once (not per batch)
        self.cider = CiderD(corpus_refs=list(references.values()))

    def texts(self, gen: Generated) -> list[str]:
        rows, lens = gen.tokens.tolist(), gen.lens.tolist()
        return [self.tokenizer.decode(r[:n]) for r, n in zip(rows, lens)]

    def __call__(self, ids: Sequence[int], gen: Generated, per_image: int) -> Tensor:
        """(len(ids) * per_image,) fp32 rewards of ``gen``'s rows (image-major: the
        ``per_image`` rows of ids[0] first), on the rows' device."""
        refs = [self.references[i] for i in ids]
        index = torch.arange(len(ids)).repeat_interleave(per_image).numpy()
        r = self.cider.score(self.texts(gen), refs, refs_index=index)
        return torch.from_numpy(r).float().to(gen.tokens.device)


def leave_one_out(rewards: Tensor, k: int) -> Tensor:
    """(B * k,) rewards, k per image -> each one's baseline: the mean of its image's other
    k - 1 rewards."""
    r = rewards.view(-1, k)
    return ((r.sum(1, keepdim=True) - r) / (k - 1)).reshape(-1)


def sequence_log_probs(model, img_tokens: Tensor, tokens: Tensor, lens: Tensor, k: int):
    """Teacher-forced log p of the generated ``tokens`` (R, T) (eos included, ``lens`` (R,)),
    R = B * k rows for ``img_tokens`` (B, N, d) -> ((R, T) log-probs, 0 after each row's end),
    the MoE balance term of the pass)."""
    R, T = tokens.shape
    bos = torch.full((R, 1), model.cfg.bos_id, dtype=tokens.dtype, device=tokens.device)
    seq = torch.cat([bos, tokens], 1)  # (R, T + 1): position t predicts tokens[:, t]
    img_kv = [
        (kk.repeat_interleave(k, 0), v.repeat_interleave(k, 0))
        for kk, v in model.image_kv(img_tokens)
    ]
    h, _, aux = model.decode(seq, lens + 1, img_kv)
    logp = model.logits(h[:, :T]).log_softmax(-1)  # (R, T, V) fp32
    picked = logp.gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.arange(T, device=tokens.device)[None, :] < lens[:, None]
    return picked * mask, aux


@dataclass
class SelfCritical:
    """The SCST objective of one micro-batch; called by the model's forward as
    ``objective(model, images)`` and returns the step's terms like the cross-entropy forward.

    ``ids`` are the micro-batch's image ids (their references give the rewards),
    ``generator`` draws the samples (on the images' device)."""

    reward: Callable[[Sequence[int], Generated, int], Tensor]
    ids: Sequence[int]
    samples: int = 5
    baseline: str = "mean"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    lambda_aux: float = 0.0
    generator: torch.Generator | None = None
    fixed_length: bool = False  # decode all steps: ZeRO-3 over ranks (fastcap.generate.greedy)
    last: Generated | None = None  # the samples of the last call (for inspection)

    def __call__(self, model, images: Tensor) -> dict[str, Tensor]:
        k = self.samples
        img_tokens, _ = model.encode_image(images)
        sampled = sample_no_grad(
            model,
            None,
            image_tokens=img_tokens.detach(),
            num_return_sequences=k,
            top_p=self.top_p,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            generator=self.generator,
            fixed_length=self.fixed_length,
        )
        self.last = sampled
        t0 = time.perf_counter()
        r = self.reward(self.ids, sampled, k)  # (B * k,)
        reward_s = time.perf_counter() - t0
        if self.baseline == "greedy":
            g = greedy_no_grad(
                model,
                None,
                image_tokens=img_tokens.detach(),
                max_new_tokens=self.max_new_tokens,
                fixed_length=self.fixed_length,
            )
            t0 = time.perf_counter()
            rg = self.reward(self.ids, g, 1)
            reward_s += time.perf_counter() - t0
            b = rg.repeat_interleave(k)
        else:
            b = leave_one_out(r, k)
        lens = sampled.lens
        logp, aux = sequence_log_probs(model, img_tokens, sampled.tokens, lens, k)
        adv = (r - b).to(logp.dtype)
        pg = -(adv[:, None] * logp).sum() / lens.sum().clamp(min=1)
        loss = pg + self.lambda_aux * aux
        dev = images.device
        out = {
            "loss": loss,
            "aux": aux.detach(),
            "scst/reward": r.mean(),
            "scst/baseline": b.mean(),
            "scst/above_baseline": (r > b).float().mean(),
            "scst/sample_len": lens.float().mean(),
            "scst/reward_ms": torch.tensor(reward_s * 1e3, device=dev),
        }
        if self.baseline == "greedy":
            out["scst/greedy_reward"] = rg.mean()
        return out


# ---------------------------------------------------------------------- the trainer's side


def read_init(cfg: TrainConfig) -> tuple[dict, Path]:
    """(weights, tokenizer path) of the run ``cfg.scst.init`` that an SCST run starts from;
    ConfigError (one line) when it is not a finished run or its weights do not fit
    ``cfg.model``."""
    from fastcap.runs import RunError, read_model

    try:
        state, _, tok_path, _ = read_model(cfg.scst.init)
    except RunError as e:
        raise ConfigError(f"--init: {e}") from None
    tok = CaptionTokenizer.load(tok_path)
    want = ckpt.model_shapes(with_tokenizer(cfg.model, tok))
    got = {k: list(v.shape) for k, v in state.items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise ConfigError(
            f"--init {cfg.scst.init}: its weights do not fit this config's model (first "
            f"difference: {bad[0]}); drop the model.* overrides"
        )
    return state, tok_path


def objective_factory(
    cfg: TrainConfig,
    records,
    tokenizer,
    *,
    device: torch.device,
    rank: int,
    fixed_length: bool,
    step: Callable[[], int],
) -> Callable:
    """micro-batch -> its :class:`SelfCritical` objective, rewarded by CIDEr-D against the
    training ``records``' references; sampling seeded by (seed, ``step()``, rank,
    micro-batch), so a resumed run draws the same captions. ``fixed_length``: ZeRO-3 over
    several ranks, where every rank must make the same module calls (its gathers pair up)."""
    sc = cfg.scst
    reward = CiderReward({r.id: r.captions for r in records}, tokenizer)
    lambda_aux = cfg.model.lambda_aux if cfg.model.moe.enabled else 0.0

    def objective_for(mb) -> SelfCritical:
        gen = torch.Generator(device=device)
        gen.manual_seed(((cfg.seed * 1_000_003 + step()) * 1009 + rank) * 64 + mb.index)
        return SelfCritical(
            reward,
            mb.ids,
            samples=sc.samples,
            baseline=sc.baseline,
            temperature=sc.temperature,
            top_p=sc.top_p,
            max_new_tokens=sc.max_new_tokens or None,
            lambda_aux=lambda_aux,
            generator=gen,
            fixed_length=fixed_length,
        )

    return objective_for
