"""Know a run's cost before paying for it: ``fastcap-train --preset NAME --plan``.

:func:`make_plan` builds the model on the meta device (no memory, no data, no DeepSpeed) and
returns a :class:`Plan`; :func:`format_plan` writes it as a text table. What it holds:

* parameters: total, trainable, active per token (routed experts count top_k of num_experts;
  the shared experts always), and the split trunk / encoder / decoder / embeddings;
* FLOPs per image from the analytic count of :mod:`fastcap.flops` (forward, and training =
  3x forward), plus the extra work teacher forcing below 1 costs, and the same forward counted
  by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device as a cross-check;
* saved activations of one training forward at the configured micro-batch per rank, with and
  without activation checkpointing, *measured* on the meta device (see
  :func:`fastcap.measure.saved_activation_bytes`);
* parameter + gradient + optimiser memory per rank, for one rank and for ZeRO-3 over 8;
* the epoch: samples and steps (from the data when its annotation file exists, else the
  preset's documented size, :data:`DATA_DEFAULTS`), and time per epoch and per run on an A100
  and an H100 SXM at their dense bf16 peaks and an assumed MFU.

With a GPU (``--plan-gpu t4|l4|a10|a100|h100``, ``2xt4`` for two of them: :data:`PLAN_GPUS`)
the plan is for that machine instead: the precision the capability policy gives it (fp16 on a
T4), the micro-batch per rank over that many ranks (ZeRO-3 when more than one), the memory a
rank needs against what the card has (the margin), and the time at that card's dense
tensor-core peak in that precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from fastcap.common import capability
from fastcap.flops import BF16_PEAK_TFLOPS, captioner_forward_flops, has_analytic_trunk
from fastcap.measure import build_meta, counted_forward_flops, counted_trunk, measure_activations
from fastcap.model import Captioner, ModelConfig
from fastcap.train.config import ConfigError, TrainConfig

DEFAULT_MFU = 0.35
"""Model FLOPs utilisation assumed for the time estimates (``--plan-mfu``): a ResNet trunk and
short (30-token) sequences keep a captioner below a large LM's 40-50%."""

GPUS = {"A100": BF16_PEAK_TFLOPS["A100"], "H100 SXM": BF16_PEAK_TFLOPS["H100 SXM"]}
"""The devices the plan times an epoch on, with their dense bf16 peaks (TFLOP/s)."""

ZERO_RANKS = 8
"""The ZeRO-3 world the optimiser-memory line is given for."""


@dataclass(frozen=True)
class PlanGPU:
    """A GPU ``--plan-gpu`` plans for: the capability policy's view of it
    (:data:`fastcap.common.capability.KNOWN_GPUS`: name, capability, memory) and its dense
    tensor-core peak in the precision the policy gives it."""

    key: str
    peak_tflops: float
    peak_source: str

    @property
    def info(self) -> capability.GPU:
        return capability.KNOWN_GPUS[self.key]


PLAN_GPUS = {
    g.key: g
    for g in (
        PlanGPU("t4", 65.0, "fp16 tensor cores, dense (T4 data sheet; no bf16)"),
        PlanGPU("l4", 121.0, "bf16 dense (L4 data sheet: 242 with sparsity)"),
        PlanGPU("a10", 125.0, "bf16 dense (A10 data sheet: 250 with sparsity)"),
        PlanGPU("a100", 312.0, "bf16 dense (A100 data sheet)"),
        PlanGPU("h100", 989.5, "bf16 dense (H100 SXM data sheet)"),
    )
}
"""The GPUs ``--plan-gpu`` knows; the peaks are data-sheet numbers, not measurements."""

ALLOWANCE = 1.0 * 2**30
"""Bytes a rank needs beyond weights, gradients, optimiser state and saved activations, assumed
(not measured here): the CUDA context, cuBLAS/cuDNN workspaces, the caching allocator's
fragmentation and backward's transients."""


def parse_plan_gpu(spec: str) -> tuple[PlanGPU, int]:
    """``t4`` -> (the T4, 1 rank); ``2xt4`` -> (the T4, 2 ranks). ConfigError otherwise."""
    ranks, _, key = spec.lower().rpartition("x") if "x" in spec.lower() else ("1", "", spec)
    key = key.strip().lower()
    if key not in PLAN_GPUS or not ranks.strip().isdigit() or int(ranks) < 1:
        raise ConfigError(
            f"--plan-gpu {spec!r}: give one of {', '.join(PLAN_GPUS)}, optionally as NxGPU "
            "(2xt4: two T4s)"
        )
    return PLAN_GPUS[key], int(ranks)


def gpu_precision(g: capability.GPU) -> str:
    """What the capability policy (:func:`fastcap.common.capability.precision_for`) gives
    ``g``: bf16 from sm_80, fp16 on sm_70/75, fp32 below."""
    if g.capability >= capability.BF16_MIN:
        return "bf16"
    return "fp16" if g.capability >= capability.FP16_MIN else "fp32"


@dataclass
class Fit:
    """One rank's memory on a planned GPU, in bytes."""

    gpu: str
    ranks: int
    memory: int
    optimizer: float
    activations: int
    allowance: float
    peak_tflops: float
    peak_source: str

    @property
    def need(self) -> float:
        return self.optimizer + self.activations + self.allowance

    @property
    def margin(self) -> float:
        return self.memory - self.need


@dataclass(frozen=True)
class DataSize:
    """Training split size: images and (image, caption) pairs, and where the numbers came from."""

    images: int
    captions: int
    source: str


KARPATHY_TRAIN = DataSize(
    113_287,
    5 * 113_287,
    "documented default: Karpathy COCO train split (train + restval), 113,287 images x 5 "
    "captions (a few images have 6 or 7; the data file gives the exact count)",
)
DATA_DEFAULTS: dict[str, DataSize] = {
    "shapes-tiny": DataSize(
        20_000,
        60_000,
        "documented default: `fastcap-data shapes` writes 20,000 train images, 3 captions each",
    ),
    "coco-base": KARPATHY_TRAIN,
    "coco-moe": KARPATHY_TRAIN,
    "photos": DataSize(
        6_000,
        30_000,
        "documented default: Karpathy Flickr8k train split, 6,000 images x 5 captions",
    ),
}
"""Training split sizes the plan assumes for a preset whose data is not on this machine."""


# ----------------------------------------------------------------------------- parameters


@dataclass
class Params:
    """Parameter counts. ``active_per_token``: what one decoder token's forward reads, i.e.
    the total less the routed experts it is not sent to (num_experts - top_k per MoE layer)."""

    total: int
    trainable: int
    active_per_token: int
    trunk: int
    encoder: int
    decoder: int
    embeddings: int
    other: int
    routed_experts: int


def count_params(model: Captioner) -> Params:
    """Parameter counts of a built model (any device, meta included)."""
    from fastcap.model.moe import MoE

    groups = {"trunk": 0, "encoder": 0, "decoder": 0, "embeddings": 0, "other": 0}
    for name, p in model.named_parameters():
        if name.startswith("vision.trunk."):
            groups["trunk"] += p.numel()
        elif name.startswith("vision."):
            groups["encoder"] += p.numel()
        elif name == "decoder.embed.weight":  # tied: also the LM head
            groups["embeddings"] += p.numel()
        elif name.startswith("decoder."):
            groups["decoder"] += p.numel()
        else:  # logit_scale, logit_bias
            groups["other"] += p.numel()
    total = sum(p.numel() for p in model.parameters())
    routed = inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            E, k = m.cfg.num_experts, m.cfg.top_k
            per_expert = (m.w13.numel() + m.w2.numel()) // E
            routed += E * per_expert
            inactive += (E - k) * per_expert
    return Params(
        total=total,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        active_per_token=total - inactive,
        routed_experts=routed,
        **groups,
    )


# ----------------------------------------------------------------------------- the plan


def trunk_count(cfg: ModelConfig) -> tuple[float, int] | None:
    """None for a trunk with an analytic count, else its counted FLOPs and channels."""
    return None if has_analytic_trunk(cfg.trunk) else counted_trunk(cfg)


def teacher_forcing_flops(
    cfg: ModelConfig, caption_len: int, trunk: tuple[float, int] | None = None
) -> float:
    """Extra FLOPs per image of a step with teacher forcing below 1: the no-grad decoder pass
    on the gold inputs (every decoder layer and the LM head, at every position) and the text
    tower's rerun on the gold caption, forward and backward."""
    f = captioner_forward_flops(cfg, caption_len, trunk or trunk_count(cfg))
    L = caption_len
    full_head = 2.0 * L * cfg.vocab_size * cfg.width  # the predictions: every position
    return f["unimodal"] + f["multimodal"] + full_head + 3.0 * f["unimodal"]


def tf_min(cfg: TrainConfig) -> float:
    """The lowest teacher-forcing probability the schedule reaches."""
    tf = cfg.tf
    return min(tf.start, tf.end) if tf.schedule != "constant" else tf.start


def data_size(cfg: TrainConfig) -> DataSize:
    """The training split's size, read from its annotation file when it exists here (images
    are never opened), else the preset's documented default."""
    from fastcap.data.records import DataError
    from fastcap.data.sources import load_split_records, parse_spec

    spec = cfg.data.data
    try:
        kind, ann, _ = parse_spec(spec, cfg.data.image_root)
        if kind != "wds":  # counting webdataset shards means reading them
            recs = load_split_records(spec, cfg.data.train_split, cfg.data.image_root)
            if recs:
                caps = sum(len(r.captions) for r in recs)
                return DataSize(len(recs), caps, f"read from {ann}")
    except (DataError, OSError, ValueError):
        pass
    if cfg.preset in DATA_DEFAULTS:
        return DATA_DEFAULTS[cfg.preset]
    raise ConfigError(
        f"--plan: the data {spec!r} is not here and preset {cfg.preset!r} has no documented "
        "size; give --data with a file that exists"
    )


def optimizer_bytes(
    params: int, persistent: int = 0, world: int = 1, fp32_grads: bool = False
) -> float:
    """Per-rank bytes of bf16 parameters (2) and gradients (2), and AdamW's fp32 master copy
    and two moments (12), per parameter. With ``world`` > 1, ZeRO-3: everything partitioned
    over the ranks except the ``persistent`` parameters (below the persistence threshold),
    whose bf16 copy every rank keeps whole. ``fp32_grads``: at one rank DeepSpeed's bf16/fp16
    optimiser (stage 0) also keeps fp32 gradients, 4 B a parameter more."""
    if world == 1:
        return (20.0 if fp32_grads else 16.0) * params
    return 2.0 * persistent + 2.0 * (params - persistent) / world + 14.0 * params / world


@dataclass
class Plan:
    """Everything :func:`format_plan` prints; sizes in bytes, FLOPs per image, times in s."""

    preset: str
    params: Params
    image_tokens: int
    caption_len: int
    flops_forward: float
    flops_train: float
    flops_tf_extra: float
    flops_counted_forward: float | None
    precision: str
    micro_batch: int
    activations: int
    activations_ckpt: int
    checkpointing: bool
    optim_world1: float
    optim_zero3: float
    data: DataSize
    epoch_unit: str
    samples_per_epoch: int
    steps_per_epoch: int
    epochs: float
    total_steps: int
    warmup_steps: int
    tf_p_min: float
    mfu: float
    epoch_seconds: dict[str, float] = field(default_factory=dict)
    fit: Fit | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(
    cfg: TrainConfig, mfu: float = DEFAULT_MFU, cross_check: bool = True, gpu: str | None = None
) -> Plan:
    """The plan of the run ``cfg`` describes, at one rank (``batch_size`` / ``grad_accum``
    per micro-batch) and decoder sequences of ``model.max_len`` positions (the worst a batch
    pads to); with ``gpu`` (``t4``, ``2xt4``: :func:`parse_plan_gpu`) on that many of that
    GPU, in the precision the capability policy gives it."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--plan-mfu {mfu}: give a fraction in (0, 1], e.g. 0.35")
    pg, ranks = parse_plan_gpu(gpu) if gpu else (None, 1)
    if cfg.batch_size % (ranks * cfg.grad_accum):
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not divide across {ranks} ranks x "
            f"{cfg.grad_accum} accumulation steps; use a multiple of {ranks * cfg.grad_accum}"
        )
    m = cfg.model
    L = m.max_len
    params = count_params(build_meta(m))
    n_img = (m.image_size // m.trunk_stride // m.patch) ** 2
    trunk = trunk_count(m)
    fwd = sum(captioner_forward_flops(m, L, trunk).values())
    tf_p = tf_min(cfg)
    tf_extra = teacher_forcing_flops(m, L, trunk) if tf_p < 1 else 0.0
    auto = gpu_precision(pg.info) if pg else "bf16"
    precision = auto if cfg.precision == "auto" else cfg.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    micro = max(1, cfg.batch_size // (ranks * cfg.grad_accum))
    act, act_ckpt = measure_activations(m, micro, L, dtype, tf_p=0.5 if tf_p < 1 else 1.0)
    meta = build_meta(m)
    persistent = sum(
        p.numel() for p in meta.parameters() if p.numel() < cfg.zero_persistence_threshold
    )
    size = data_size(cfg)
    unit = cfg.data.epoch_unit
    samples = size.captions if unit == "caption" else size.images
    steps = samples // cfg.batch_size
    total = cfg.max_steps or max(1, int(cfg.epochs * steps))
    per_sample = 3.0 * fwd + tf_extra
    peaks = {f"{ranks} x {pg.key.upper()}": pg.peak_tflops} if pg else GPUS
    seconds = {
        name: steps * cfg.batch_size * per_sample / (ranks * peak * 1e12 * mfu)
        for name, peak in peaks.items()
    }
    fit = None
    if pg:
        half = precision != "fp32"
        fit = Fit(
            gpu=pg.info.label(),
            ranks=ranks,
            memory=pg.info.total_memory,
            optimizer=optimizer_bytes(params.total, persistent, ranks, fp32_grads=half),
            activations=act_ckpt if cfg.checkpointing else act,
            allowance=ALLOWANCE,
            peak_tflops=pg.peak_tflops,
            peak_source=pg.peak_source,
        )
    return Plan(
        preset=cfg.preset,
        params=params,
        image_tokens=n_img,
        caption_len=L,
        flops_forward=fwd,
        flops_train=3.0 * fwd,
        flops_tf_extra=tf_extra,
        flops_counted_forward=counted_forward_flops(m, L) if cross_check else None,
        precision=precision,
        micro_batch=micro,
        activations=act,
        activations_ckpt=act_ckpt,
        checkpointing=cfg.checkpointing,
        optim_world1=optimizer_bytes(params.total),
        optim_zero3=optimizer_bytes(params.total, persistent, ZERO_RANKS),
        data=size,
        epoch_unit=unit,
        samples_per_epoch=samples,
        steps_per_epoch=steps,
        epochs=cfg.epochs,
        total_steps=total,
        warmup_steps=cfg.optim.warmup_steps,
        tf_p_min=tf_p,
        mfu=mfu,
        epoch_seconds=seconds,
        fit=fit,
    )


# ----------------------------------------------------------------------------- the table


def _n(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _time(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def format_plan(p: Plan) -> str:
    """The plan as a text table."""
    q = p.params
    rows: list[tuple[str, str]] = []

    def row(k: str, v: str) -> None:
        rows.append((k, v))

    row("parameters", f"{_n(q.total)} total, {_n(q.trainable)} trainable")
    row(
        "  active per token",
        f"{_n(q.active_per_token)}"
        + (
            f" (routed experts {_n(q.routed_experts)} in all, top_k of them per token)"
            if q.routed_experts
            else " (dense: all)"
        ),
    )
    row(
        "  by part",
        f"trunk {_n(q.trunk)}, encoder {_n(q.encoder)}, decoder {_n(q.decoder)}, "
        f"embeddings {_n(q.embeddings)} (tied LM head), other {q.other}",
    )
    row("sequence", f"{p.image_tokens} image tokens, {p.caption_len} caption positions (max_len)")
    row(
        "FLOPs per image",
        f"forward {_n(p.flops_forward)}, training (fwd+bwd = 3x) {_n(p.flops_train)}",
    )
    if p.flops_tf_extra:
        row(
            "  teacher forcing < 1",
            f"+{_n(p.flops_tf_extra)} per image (no-grad decoder pass, text-tower rerun)",
        )
    if p.flops_counted_forward is not None:
        ratio = p.flops_counted_forward / p.flops_forward
        row(
            "  FlopCounterMode (meta, ref ops)",
            f"forward {_n(p.flops_counted_forward)} = {ratio:.3f}x analytic",
        )
    on = "on" if p.checkpointing else "off"
    row(
        f"activations ({p.precision}, batch {p.micro_batch}/rank)",
        f"{_gib(p.activations)} without checkpointing, {_gib(p.activations_ckpt)} with "
        f"(config: {on}; measured on meta)",
    )
    row(
        "params+grads+AdamW per rank",
        f"{_gib(p.optim_world1)} at 1 rank (16 B/param; DeepSpeed's bf16 optimiser at stage 0 "
        f"adds fp32 grads, 4 B/param), {_gib(p.optim_zero3)} per rank under ZeRO-3 x "
        f"{ZERO_RANKS}",
    )
    row("data", f"{p.data.images:,} images, {p.data.captions:,} captions ({p.data.source})")
    row(
        "epoch",
        f"{p.samples_per_epoch:,} samples (epoch_unit {p.epoch_unit}) = "
        f"{p.steps_per_epoch:,} steps of {p.samples_per_epoch // max(p.steps_per_epoch, 1)}"
        if p.steps_per_epoch
        else "no full step",
    )
    warm = p.warmup_steps / p.total_steps if p.total_steps else 0
    row(
        "run",
        f"{p.epochs:g} epochs = {p.total_steps:,} steps; warmup {p.warmup_steps:,} "
        f"({warm:.1%}); teacher forcing down to p={p.tf_p_min:g}",
    )
    f = p.fit
    if f is not None:
        zero = f"ZeRO-3 over {f.ranks}" if f.ranks > 1 else "1 rank"
        row("GPU", f"{f.ranks} x {f.gpu}, {_gib(f.memory)} each: {p.precision} (capability policy)")
        row(
            "memory per rank",
            f"{_gib(f.need)} = params+grads+AdamW {_gib(f.optimizer)} ({zero}) + activations "
            f"{_gib(f.activations)} (batch {p.micro_batch}/rank, checkpointing {on}) + "
            f"{_gib(f.allowance)} allowance (context, workspaces, fragmentation: assumed)",
        )
        verdict = "fits" if f.margin > 0 else "does NOT fit"
        row("  margin", f"{_gib(f.margin)} ({f.margin / f.memory:.0%} of the card): {verdict}")
    for gpu, s in p.epoch_seconds.items():
        run = s * p.total_steps / max(p.steps_per_epoch, 1)
        if f is not None:
            peak = f"{f.peak_tflops:g} TFLOP/s {f.peak_source}"
            label = f"time on {gpu}"
        else:
            peak, label = f"{GPUS[gpu]:g} TFLOP/s bf16 peak", f"time on 1 {gpu}"
        row(label, f"{_time(s)} per epoch, {_time(run)} per run ({peak} x {p.mfu:.0%} MFU)")
    width = max(len(k) for k, _ in rows)
    head = f"fastcap-train --plan: {p.preset}"
    return "\n".join([head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v in rows])
