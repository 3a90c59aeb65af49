"""The engine set-up: which ZeRO stage a run gets, the DeepSpeed JSON built from the config,
and the plain fp32 engine's optimiser that clips and refuses non-finite updates."""

from __future__ import annotations

import copy

import pytest
import torch

from fastcap.train import engine as eng
from fastcap.train.config import ConfigError, build


def test_zero3_with_ranks_plain_engine_alone_and_the_override():
    cfg = build("shapes-tiny")
    assert eng.zero_stage(cfg, 1) == 0 and eng.zero_stage(cfg, 2) == 3
    one, two = eng.deepspeed_config(cfg, 1, "fp32"), eng.deepspeed_config(cfg, 2, "fp32")
    assert one["zero_optimization"] == {"stage": 0}
    assert two["zero_optimization"]["stage"] == 3
    assert two["zero_optimization"]["stage3_param_persistence_threshold"] == 100_000
    # the plain fp32 engine leaves clipping to FiniteAdamW; everything else clips in DeepSpeed
    assert one["gradient_clipping"] == 0.0 and two["gradient_clipping"] == 1.0
    assert eng.deepspeed_config(cfg, 1, "bf16")["gradient_clipping"] == 1.0
    forced = build("shapes-tiny", overrides=["zero_stage=3"])
    assert eng.deepspeed_config(forced, 1, "fp32")["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="zero_stage 4"):
        build("shapes-tiny", overrides=["zero_stage=4"])


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]


def test_finite_adamw_clips_like_torch_and_refuses_non_finite_updates():
    ps, qs = _params(), _params()
    ref = torch.optim.AdamW(qs, lr=0.1, weight_decay=0.05)
    opt = eng.FiniteAdamW(ps, max_norm=0.5, lr=0.1, weight_decay=0.05)
    for step in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.full_like(p, 3.0 + step)
            q.grad = p.grad.clone()
        want = float(torch.nn.utils.clip_grad_norm_(qs, 0.5))
        ref.step()
        opt.step()
        assert not opt.overflow and opt._global_grad_norm == pytest.approx(want)
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy(opt.state_dict())
    ps[0].grad[0, 0] = float("nan")
    opt.step()
    assert opt.overflow
    assert all(torch.equal(p, b) for p, b in zip(ps, before))  # weights untouched
    assert opt.state_dict()["state"][0]["step"] == state["state"][0]["step"]  # Adam state too


def test_optional_fields_are_coerced_from_the_command_line():
    """``X | None`` fields read their type, not the raw string ("false" is not truthy)."""
    cfg = build("shapes-tiny", overrides=["data.in_memory=false", "zero_stage=2"])
    assert cfg.data.in_memory is False and cfg.zero_stage == 2
    assert build("shapes-tiny", overrides=["data.in_memory=none"]).data.in_memory is None
