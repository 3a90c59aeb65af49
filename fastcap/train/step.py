"""One optimiser step: the global batch's share of this rank split into micro-batches,
forward and backward through the engine for each, a non-finite micro-batch skipped without
moving the optimiser schedule.

Why a skipped micro-batch still runs a backward: DeepSpeed counts micro-steps to find the
accumulation boundary, and ZeRO-3 traces the order in which modules fetch their parameters.
Skipping ``backward``/``step`` for one micro-batch would shift every later boundary (each
optimiser step would straddle two of ours) and leave the fetch trace mid-way. So a stand-in (one
blank sample at weight 0) takes its place: the counters advance, the gradient gains nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fastcap.data.records import Batch
from fastcap.train.collectives import all_finite, mean_over_ranks

log = logging.getLogger("fastcap.train")

TERMS = ("loss", "ce", "clip", "aux", "tf_pred", "logit_scale")


@dataclass
class Micro:
    """One micro-batch on the device: rows [lo, hi) of this rank's batch."""

    index: int
    images: torch.Tensor  # (b, 3, S, S) uint8, or the trunk's cached features (b, C, g, g)
    tokens: torch.Tensor  # (b, L), L = the longest caption of the slice
    lens: torch.Tensor  # (b,)
    ids: list[int]  # the images' record ids


def micro_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Split n rows into ``parts`` slices whose sizes differ by at most one (empty ones only
    when n < parts): a short batch is split, never truncated."""
    q, r = divmod(n, parts)
    cuts = [a * q + min(a, r) for a in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def to_micro(batch: Batch, index: int, lo: int, hi: int, device, dtype, features=None) -> Micro:
    """Rows [lo, hi) of ``batch`` on ``device``: uint8 images (the model normalises them for
    its trunk), or, with ``features`` (a :class:`fastcap.data.features.FeatureTable` of a
    frozen trunk), the images' cached trunk maps in the engine's ``dtype``."""
    lens = batch.lens[lo:hi]
    L = int(lens.max())
    if features is not None:
        images = features.lookup(batch.ids[lo:hi]).to(device, dtype, non_blocking=True)
    else:
        images = batch.images[lo:hi].to(device, non_blocking=True)
    tokens = batch.tokens[lo:hi, :L].to(device)
    return Micro(index, images, tokens, lens.to(device), batch.ids[lo:hi])


def forward_micro(engine, mb: Micro, p: float, generator, capture: bool, objective=None) -> dict:
    """The engine's forward (every loss, or ``objective``'s) of one micro-batch; the fault
    tests wrap this."""
    return engine(
        mb.images,
        mb.tokens,
        mb.lens,
        tf_p=p,
        generator=generator,
        capture=capture,
        objective=objective,
    )


class StepRunner:
    """Runs optimiser steps of one engine; ``device`` serves the process group's collectives,
    ``dtype`` is the engine's parameter dtype; ``objective_for(micro)``, if given, makes the
    training objective of each micro-batch (SCST), else the model's own losses are used;
    ``features`` (a frozen trunk's cached maps) replace the images when given."""

    def __init__(
        self,
        engine,
        *,
        grad_accum: int,
        device: torch.device,
        dtype: torch.dtype,
        objective_for=None,
        features=None,
    ):
        self.engine, self.parts, self.device, self.dtype = engine, grad_accum, device, dtype
        self.objective_for, self.features = objective_for, features

    def _stand_in(self, batch: Batch, p: float, poison: bool) -> None:
        """Forward + backward of one blank sample at weight 0. ``poison`` (no micro-batch of
        the step was usable) makes the gradient non-finite instead, so that the engine
        discards the whole update rather than apply stale Adam momentum."""
        mb = to_micro(batch, -1, 0, 1, self.device, self.dtype, self.features)
        mb.images.zero_()
        gen = torch.Generator().manual_seed(0)  # the run's own generator must not move
        out = forward_micro(self.engine, mb, p, gen, capture=False)
        self.engine.backward(out["loss"] * (float("nan") if poison else 0.0))
        self.engine.step()

    def run(self, batch: Batch, *, p: float, generator, capture: bool, step: int) -> dict:
        """One optimiser step (``step`` is its 1-based number, for messages and for freezing
        the trunk through step ``model.freeze_trunk_steps``). Returns the
        batch-mean terms averaged over ranks, the LR the update used, and ``fault/...``."""
        engine = self.engine
        engine.train()
        if hasattr(vision := getattr(engine.module, "vision", None), "trunk_frozen"):
            vision.trunk_frozen = step <= vision.cfg.freeze_trunk_steps  # model.freeze_trunk_steps
        lr = engine.get_lr()[0]  # read before the scheduler moves on
        n = len(batch.ids)
        logs: dict = {}
        skipped = used = 0
        for a, (lo, hi) in enumerate(micro_bounds(n, self.parts)):
            poison = a == self.parts - 1 and used == 0
            if hi == lo:  # a batch shorter than grad_accum: nothing to learn from here
                self._stand_in(batch, p, poison)
                continue
            mb = to_micro(batch, a, lo, hi, self.device, self.dtype, self.features)
            objective = self.objective_for(mb) if self.objective_for else None
            out = forward_micro(engine, mb, p, generator, capture and a == 0, objective)
            if not all_finite(out["loss"], self.device):  # a vote: every rank skips together
                skipped += 1
                terms = {k: float(out[k]) for k in ("loss", "ce", "clip", "aux") if k in out}
                log.warning("step %d: non-finite loss %s; micro-batch skipped", step, terms)
                logs.update({f"fault/{k}": v for k, v in terms.items()})
                del out  # its graph holds non-finite activations: never backward through it
                self._stand_in(batch, p, poison)
                continue
            used += 1
            share = (hi - lo) / n  # this slice's weight in the batch mean
            scale = share * self.parts  # 1.0 for equal slices: the loss is left untouched
            engine.backward(out["loss"] if scale == 1.0 else out["loss"] * scale)
            engine.step()
            # keep numbers, never the graph: nothing that holds it outlives the step. One host
            # transfer for all the terms, not one synchronisation per term.
            keys = list(out)
            values = torch.stack([out[k].detach().float().reshape(()) for k in keys]).tolist()
            for k, v in zip(keys, values):
                logs[k] = logs.get(k, 0.0) + v * share
            del out
        for k in TERMS:
            logs.setdefault(k, float("nan"))  # every micro-batch skipped: nothing measured
        if not engine.was_step_applied():
            # the engine discarded the update (nothing usable, or a non-finite gradient):
            # the schedule still advances with the step count, as in a run without the fault
            engine.lr_scheduler.step()
        # every rank ran the same objective (and skipped the same micro-batches: a vote), so
        # all hold the same keys
        keys = sorted(k for k in logs if k != "logit_scale" and not k.startswith("fault/"))
        logs.update(zip(keys, mean_over_ranks([logs[k] for k in keys], self.device)))
        logs.update({"lr": lr, "fault/skipped": float(skipped)})
        return logs
