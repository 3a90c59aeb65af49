"""Training configuration: nested dataclasses with a docstring per field, named presets,
``--config FILE`` (YAML or JSON) and ``key.sub=value`` overrides with close-match suggestions."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcap.model.config import ModelConfig, MoEConfig


class ConfigError(ValueError):
    """A bad preset, key or value; the message says how to fix it."""


@dataclass
class DataConfig:
    """Where the captions and images come from."""

    data: str = "shapes:data/shapes"
    """Dataset as kind:path: shapes:DIR, karpathy:FILE, coco:FILE[=SPLIT][,...], folder:DIR,
    wds:PATTERN (see fastcap.data.sources)."""
    in_memory: bool | None = None
    """Decode the training split into memory (None: in memory up to 50k images, streamed
    through DataLoader workers above)."""
    max_bad_fraction: float = 0.01
    """Stop with an error when more than this share of records is unreadable or empty."""
    image_root: str | None = None
    """Image folder for karpathy/coco data when it is not beside the annotation file."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "val"
    """Split used for periodic evaluation."""
    eval_splits: list[str] = field(default_factory=lambda: ["test", "compositional"])
    """Splits scored at the end of training."""
    vocab_size: int = 96
    """BPE vocabulary size (trained on the training captions, saved in the run folder)."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the main process)."""
    epoch_unit: str = "image"
    """What one epoch enumerates: image (every training image once, with one of its captions
    drawn at random) or caption (every caption of every image once: COCO's 5 captions per
    image make such an epoch 5 image-epochs long). Not for wds shards."""


@dataclass
class OptimConfig:
    """Optimiser and schedule."""

    lr: float = 2e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.05
    """Final LR of the cosine decay as a fraction of lr."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, embeddings' position tables)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass
class TeacherForcingConfig:
    """Scheduled teacher forcing: p(step) = probability of reading the gold token."""

    schedule: str = "constant"
    """constant | linear | inverse_sigmoid."""
    start: float = 1.0
    """p at step 0 (linear) and the constant value (constant)."""
    end: float = 1.0
    """p at the last step (linear) and the floor of inverse_sigmoid."""
    k: float = 2000.0
    """inverse_sigmoid steepness: p = k / (k + exp(step / k)), floored at end."""


@dataclass
class TrainConfig:
    """One training run."""

    preset: str = "shapes-tiny"
    """Name of the preset these values started from."""
    out: str = "runs/shapes-tiny"
    """Run folder: checkpoints, tokenizer, config, metrics.json."""
    seed: int = 0
    """Seed of every random generator."""
    epochs: float = 6.0
    """Training length in epochs over the training split (fractions allowed). shapes-tiny: 6
    (5 gave 0.979 greedy test accuracy, short of 0.99; the one-rank engine and channels-last
    trunk made the sixth epoch affordable inside make train's 12 minutes)."""
    max_steps: int = 0
    """If > 0, stop after this many optimiser steps regardless of epochs."""
    batch_size: int = 128
    """Global batch size per optimiser step (split over ranks and accumulation)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    precision: str = "auto"
    """auto (bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPU) | fp32 | fp16 | bf16."""
    checkpointing: bool = False
    """Activation (gradient) checkpointing of every Transformer layer."""
    zero_stage: int | None = None
    """DeepSpeed ZeRO stage (0-3). None: 3 with more than one rank, 0 (DeepSpeed's plain engine:
    nothing to partition, and ZeRO-3's hooks cost about a tenth of a CPU step) with one."""
    zero_persistence_threshold: int = 100_000
    """ZeRO-3 keeps parameters with fewer elements than this unpartitioned (DeepSpeed's
    stage3_param_persistence_threshold); gradients and optimiser states stay partitioned."""
    eval_every: int = 0
    """Evaluate on the val split every N steps (0: once per epoch)."""
    eval_samples: int = 500
    """Images of the val split decoded at each periodic evaluation."""
    save_every: int = 0
    """Checkpoint every N steps (0: once per epoch and at the end)."""
    keep_checkpoints: int = 2
    """Keep the last K checkpoints."""
    log_every: int = 10
    """Log scalars every N steps."""
    diag_every: int = 100
    """Log the instruments (activation RMS, attention/router entropy) every N steps."""
    max_bad_steps: int = 10
    """Stop (with a checkpoint of the last good state) after this many consecutive steps whose
    loss was non-finite; each such step is skipped and logged."""
    wandb: str = "offline"
    """Weights & Biases mode: online | offline | disabled."""
    wandb_project: str = "fastcap"
    """W&B project name."""
    num_samples: int = 8
    """Sample captions printed at each evaluation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The captioner."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimiser."""
    tf: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    """Scheduled teacher forcing."""


def _shapes_tiny() -> TrainConfig:
    return TrainConfig()


def _coco_base() -> TrainConfig:
    return TrainConfig(
        preset="coco-base",
        out="runs/coco-base",
        epochs=10,
        batch_size=256,
        precision="auto",
        checkpointing=True,
        eval_every=2000,
        save_every=2000,
        eval_samples=2000,
        log_every=50,
        diag_every=500,
        model=ModelConfig(
            trunk="resnet50",
            trunk_stride=32,
            image_size=384,
            patch=1,
            width=768,
            heads=12,
            encoder_layers=6,
            unimodal_layers=6,
            multimodal_layers=6,
            max_len=40,
            vocab_size=16384,
            embed_dim=512,
            label_smoothing=0.1,
            lambda_clip=1.0,
            moe=MoEConfig(
                enabled=True,
                num_experts=64,
                num_shared=2,
                top_k=6,
                expert_hidden=512,
                first_dense=True,
            ),
        ),
        data=DataConfig(
            data="karpathy:data/coco/dataset_coco.json",
            image_root="data/coco",
            eval_splits=["test"],
            vocab_size=16384,
            num_workers=8,
        ),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, weight_decay=0.1),
        tf=TeacherForcingConfig(schedule="inverse_sigmoid", start=1.0, end=0.75, k=4000.0),
    )


PRESETS = {"shapes-tiny": _shapes_tiny, "coco-base": _coco_base}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.preset = name
    return cfg


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a string (from the command line) or a parsed JSON/YAML value to ``typ``."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] and X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if typ in (int, float, str):
            return typ(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            inner = args[0] if args else str
            return origin(_coerce(v, inner, key) for v in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key {key}: cannot read {value!r} as {typ}") from e
    return value


def set_key(cfg: Any, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` on nested dataclasses; unknown keys raise with a close-match suggestion."""
    obj, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            prefix = ".".join(parts[:i])
            full = [f"{prefix}.{n}" if prefix else n for n in names]
            close = difflib.get_close_matches(dotted, full, n=1) or difflib.get_close_matches(
                part, names, n=1
            )
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        typ = typing.get_type_hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(typ):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key {dotted} is a section; give its fields")
                for k, v in value.items():
                    set_key(getattr(obj, part), k, v)
            else:
                setattr(obj, part, _coerce(value, typ, dotted))
        else:
            obj = getattr(obj, part)


def apply_dict(cfg: TrainConfig, values: dict, prefix: str = "") -> None:
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            apply_dict(cfg, v, key + ".")
        else:
            set_key(cfg, key, v)


def load_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # any parse error becomes one clear line
        kind = p.suffix.lstrip(".") or "JSON"
        raise ConfigError(f"config file {p}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of keys to values")
    return data


def build(
    name: str = "shapes-tiny",
    file: str | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> TrainConfig:
    """Preset (or ``base``, the saved config of a run being resumed), then the file, then
    ``key=value`` overrides; validated."""
    cfg = from_dict(base) if base is not None else preset(name)
    if file:
        apply_dict(cfg, load_file(file))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: write it as key=value, e.g. optim.lr=1e-3")
        k, v = item.split("=", 1)
        set_key(cfg, k.strip(), v.strip())
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.tf.schedule not in ("constant", "linear", "inverse_sigmoid"):
        raise ConfigError(
            f"tf.schedule {cfg.tf.schedule!r}: use constant, linear or inverse_sigmoid"
        )
    if cfg.precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ConfigError(f"precision {cfg.precision!r}: use auto, fp32, fp16 or bf16")
    if cfg.wandb not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb {cfg.wandb!r}: use online, offline or disabled")
    if cfg.zero_stage not in (None, 0, 1, 2, 3):
        raise ConfigError(f"zero_stage {cfg.zero_stage}: use 0, 1, 2 or 3 (or none: automatic)")
    if cfg.data.epoch_unit not in ("image", "caption"):
        raise ConfigError(f"data.epoch_unit {cfg.data.epoch_unit!r}: use image or caption")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("batch_size and grad_accum must be >= 1")
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    cfg = TrainConfig()
    apply_dict(cfg, copy.deepcopy(d))
    return cfg
