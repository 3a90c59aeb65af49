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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from fastcap.flops import BF16_PEAK_TFLOPS, captioner_forward_flops
from fastcap.measure import build_meta, counted_forward_flops, measure_activations
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


def teacher_forcing_flops(cfg: ModelConfig, caption_len: int) -> float:
    """Extra FLOPs per image of a step with teacher forcing below 1: the no-grad decoder pass
    on the gold inputs (every decoder layer and the LM head, at every position) and the text
    tower's rerun on the gold caption, forward and backward."""
    f = captioner_forward_flops(cfg, caption_len)
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


def optimizer_bytes(params: int, persistent: int = 0, world: int = 1) -> float:
    """Per-rank bytes of bf16 parameters (2) and gradients (2), and AdamW's fp32 master copy
    and two moments (12), per parameter. With ``world`` > 1, ZeRO-3: everything partitioned
    over the ranks except the ``persistent`` parameters (below the persistence threshold),
    whose bf16 copy every rank keeps whole."""
    if world == 1:
        return 16.0 * params
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

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(cfg: TrainConfig, mfu: float = DEFAULT_MFU, cross_check: bool = True) -> Plan:
    """The plan of the run ``cfg`` describes, at one rank (``batch_size`` / ``grad_accum``
    per micro-batch) and decoder sequences of ``model.max_len`` positions (the worst a batch
    pads to)."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--plan-mfu {mfu}: give a fraction in (0, 1], e.g. 0.35")
    m = cfg.model
    L = m.max_len
    params = count_params(build_meta(m))
    n_img = (m.image_size // m.trunk_stride // m.patch) ** 2
    fwd = sum(captioner_forward_flops(m, L).values())
    tf_p = tf_min(cfg)
    tf_extra = teacher_forcing_flops(m, L) if tf_p < 1 else 0.0
    precision = "bf16" if cfg.precision == "auto" else cfg.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    micro = max(1, cfg.batch_size // cfg.grad_accum)
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
    seconds = {
        gpu: steps * cfg.batch_size * per_sample / (peak * 1e12 * mfu) for gpu, peak in GPUS.items()
    }
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
    for gpu, s in p.epoch_seconds.items():
        peak = GPUS[gpu]
        run = s * p.total_steps / max(p.steps_per_epoch, 1)
        row(
            f"time on 1 {gpu}",
            f"{_time(s)} per epoch, {_time(run)} per run ({peak:g} TFLOP/s bf16 peak x "
            f"{p.mfu:.0%} MFU)",
        )
    width = max(len(k) for k, _ in rows)
    head = f"fastcap-train --plan: {p.preset}"
    return "\n".join([head, "-" * len(head)] + [f"{k:<{width}}  {v}" for k, v in rows])
