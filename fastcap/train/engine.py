"""DeepSpeed set-up: distributed init, the ZeRO stage (3 with more than one rank, the plain
engine with one), the DeepSpeed JSON built from the config in one function, the engine, and
reading full weights back out of the partitions.

This is the only module that touches DeepSpeed's API; the model never imports it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import warnings

import torch

from fastcap.common import capability
from fastcap.model import Captioner, MoE
from fastcap.train.config import ConfigError, TrainConfig

log = logging.getLogger("fastcap.train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(cuda: bool) -> str:
    """The torch.distributed backend string: gloo on a CPU machine; on GPUs NCCL for CUDA
    tensors AND gloo for CPU tensors. The loop builds its own collectives on the rank's device
    (see :mod:`fastcap.train.collectives`), but a CPU tensor handed to a collective anywhere in
    the training path (ours, DeepSpeed's, a user's callback) must find a backend instead of
    failing the first step of a multi-GPU run: NCCL alone rejects CPU tensors."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed (see :func:`process_group_backend`) and DeepSpeed's view of
    it. A plain ``fastcap-train`` is a world of one; ``deepspeed --num_gpus N`` / ``torchrun``
    set RANK, WORLD_SIZE and the rendezvous. Returns (rank, world size, device).
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    import deepspeed

    if not cuda and os.environ.get("WORLD_SIZE") == "1":
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce op (~30 s on a fresh
        # machine) that only speeds up collectives between processes: a world of one skips it
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    # DeepSpeed calls the c10d collectives torch renamed; torch warns on every call (each step)
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning
    )
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():  # DeepSpeed then wraps this group
            torch.distributed.init_process_group(backend=process_group_backend(True))
    if not torch.distributed.is_initialized() or cuda:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype of the engine's parameters (and so of its inputs) for each precision."""


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """The training precision: ``auto`` asks the capability policy
    (:func:`fastcap.common.capability.precision_for`: bf16 from compute capability 8.0, fp16
    with loss scaling on 7.0 / 7.5, fp32 below and on the CPU) and logs the choice and its
    reason once. An explicit bf16 on a GPU without native bf16, or fp16 below sm_70, is a
    one-line ConfigError naming the GPU (torch would emulate bf16 and the Triton kernels
    cannot compile it; DeepSpeed refuses fp16 there)."""
    chosen, why = capability.explain_precision(device)
    if cfg.precision == "auto":
        capability.log_once(log, f"fastcap.train: precision {chosen} (auto): {why}")
        return chosen
    g = capability.gpu(device)
    if g is not None and cfg.precision == "bf16" and not g.bf16:
        raise ConfigError(
            f"precision=bf16 needs compute capability 8.0 or higher; {g.label()} has no "
            f"native bf16: use precision=auto ({chosen}) or fp16"
        )
    if g is not None and cfg.precision == "fp16" and g.capability < capability.FP16_MIN:
        raise ConfigError(f"precision=fp16 needs compute capability 7.0 or higher ({g.label()}); "
                         "use precision=auto (fp32)")  # fmt: skip
    return cfg.precision


def zero_stage(cfg: TrainConfig, world: int) -> int:
    """ZeRO-3 whenever there is more than one rank; with one rank there is nothing to
    partition, and ZeRO-3's per-module fetch/release hooks cost 9-14% of a step of shapes-tiny
    on a CPU (bench/RESULTS.md), so a world of one runs DeepSpeed's plain engine (stage 0):
    the same optimiser, clipping, precision and checkpoints, without the hooks."""
    if cfg.zero_stage is not None:
        return cfg.zero_stage
    return 3 if world > 1 else 0


def plain_fp32(cfg: TrainConfig, world: int, precision: str) -> bool:
    """DeepSpeed's plain engine in fp32: no ZeRO, no loss scaler, no overflow check."""
    return zero_stage(cfg, world) == 0 and precision == "fp32"


def deepspeed_config(cfg: TrainConfig, world: int, precision: str) -> dict:
    """The whole DeepSpeed JSON, from the training config (ZeRO stage from :func:`zero_stage`)."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"batch_size {cfg.batch_size} does not divide across {world} ranks x "
            f"{cfg.grad_accum} accumulation steps; use a multiple of {world * cfg.grad_accum}"
        )
    ds = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch_size // (world * cfg.grad_accum),
        "gradient_accumulation_steps": cfg.grad_accum,
        # the plain fp32 engine's optimiser clips (FiniteAdamW); everywhere else DeepSpeed does
        "gradient_clipping": 0.0 if plain_fp32(cfg, world, precision) else cfg.optim.grad_clip,
        "zero_optimization": {"stage": zero_stage(cfg, world)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds["zero_optimization"]["stage"] == 3:
        ds["zero_optimization"].update(
            {
                "overlap_comm": torch.cuda.is_available(),
                "contiguous_gradients": True,
                "stage3_param_persistence_threshold": cfg.zero_persistence_threshold,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return ds


def param_groups(
    model: torch.nn.Module, weight_decay: float, trunk_apart: bool = False
) -> list[dict]:
    """AdamW groups: no decay for 1-D tensors (norms, biases, scalars) and position tables.
    With ``trunk_apart`` the vision trunk's parameters make two more groups (decay, no decay)
    after those, whose LR :func:`build_engine` holds at 0 while the trunk is frozen."""
    groups: dict[tuple[bool, bool], list] = {(t, d): [] for t in (0, 1) for d in (1, 0)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        trunk = trunk_apart and name.startswith("vision.trunk.")
        decay = not (p.ndim < 2 or "pos_" in name or name.endswith("logit_scale"))
        groups[trunk, decay].append(p)
    return [
        {"params": groups[t, d], "weight_decay": weight_decay if d else 0.0}
        for t in ((0, 1) if trunk_apart else (0,))
        for d in (1, 0)
    ]


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that clips the gradient norm itself and discards an update whose gradient is not
    finite, saying so through ``overflow``, the attribute DeepSpeed's engine reads to count a
    skipped step. DeepSpeed's ZeRO, bf16 and fp16 optimisers do both themselves; its plain fp32
    engine (stage 0, one rank) clips but never checks, so a non-finite gradient would poison
    the weights. ``max_norm`` 0 disables clipping."""

    overflow = False
    _global_grad_norm = None  # read by engine.get_global_grad_norm(): the norm before clipping

    def __init__(self, params, *, max_norm: float, **kw):
        super().__init__(params, **kw)
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, torch.tensor(norm))
        return super().step(closure)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warm = max(cfg.optim.warmup_steps, 0)
    floor = cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min((step - warm) / max(total_steps - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def frozen_for(steps: int, f):
    """``f`` held at 0 for the first ``steps`` optimiser steps (LambdaLR's index counts the
    steps taken, so step k + 1 uses index k): the trunk groups' LR while the trunk is frozen.
    The trunk then gets no gradient, but DeepSpeed hands the optimiser zeros for it (the plain
    engine fills missing grads with zeros before its all-reduce, ZeRO-3 partitions zeros), and
    AdamW's decoupled weight decay, p -= lr * wd * p, would still move it."""

    def g(step: int) -> float:
        return 0.0 if step < steps else f(step)

    return g


def build_engine(model: Captioner, cfg: TrainConfig, world: int, precision: str, total_steps: int):
    """Wrap the model in a DeepSpeed engine (ZeRO-3 with more than one rank) with AdamW and
    warmup + cosine LR."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    z3 = zero_stage(cfg, world) == 3
    # MoE: which experts run depends on the data, so ZeRO-3 must gather the block as one leaf
    if z3 and any(isinstance(m, MoE) for m in model.modules()):
        set_z3_leaf_modules(model, [MoE])
    frozen = cfg.model.freeze_trunk_steps  # the trunk's own groups only then: same layout
    groups = param_groups(model, cfg.optim.weight_decay, trunk_apart=frozen > 0)
    hp = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=1e-8)
    if plain_fp32(cfg, world, precision):  # clips and checks itself (the engine does not)
        opt = FiniteAdamW(groups, max_norm=cfg.optim.grad_clip, **hp)
    else:
        opt = torch.optim.AdamW(groups, **hp)
    f = lr_lambda(cfg, total_steps)
    lambdas = [f, f] + [frozen_for(frozen, f)] * (len(groups) - 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        config=deepspeed_config(cfg, world, precision),
    )
    if z3:  # the tied embedding is read by the LM head outside the Embedding's own forward
        deepspeed.zero.register_external_parameter(model, model.decoder.embed.weight)
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (gathered from the ZeRO-3 partitions, if any), fp32, on the
    CPU."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {
            k: v.detach().float().cpu().clone() if v.is_floating_point() else v.cpu().clone()
            for k, v in module.state_dict().items()
        }


def partition_fraction(engine) -> float:
    """Share of all parameter elements this rank holds (1/world for fully partitioned)."""
    held = total = 0
    for p in engine.module.parameters():
        total += getattr(p, "ds_numel", p.numel())
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return held / max(total, 1)
