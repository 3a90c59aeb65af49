"""Scheduled teacher-forcing probability p(step): the chance of reading the gold token.

The two-pass mixing itself lives in :func:`fastcap.model.mix_inputs` (the model's forward runs
it); this module only says how p moves with the step.
"""

from __future__ import annotations

import math

from fastcap.train.config import TeacherForcingConfig


def tf_prob(cfg: TeacherForcingConfig, step: int, total_steps: int) -> float:
    """p at ``step`` of ``total_steps``.

    * constant: ``start``.
    * linear: ``start`` to ``end`` over the run.
    * inverse_sigmoid (Bengio et al. 2015): k / (k + exp(step / k)), never below ``end``.
    """
    if cfg.schedule == "constant":
        return float(cfg.start)
    if cfg.schedule == "linear":
        frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return float(cfg.start + (cfg.end - cfg.start) * frac)
    if cfg.schedule == "inverse_sigmoid":
        k = cfg.k
        x = step / k
        p = k / (k + math.exp(x)) if x < 700 else 0.0
        return float(max(cfg.end, min(cfg.start, p)))
    raise ValueError(f"unknown teacher-forcing schedule {cfg.schedule!r}")
