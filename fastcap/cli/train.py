"""fastcap-train: parse arguments into a TrainConfig and run the trainer. No logic here."""

from __future__ import annotations

import argparse
import json
import sys

from fastcap.data.records import DataError
from fastcap.model.trunk_weights import TrunkWeightsError
from fastcap.train.config import PRESETS, SCST_DEFAULTS, ConfigError, build


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastcap-train",
        description="Train an image captioner under DeepSpeed ZeRO-3 (world size 1 by default; "
        "`deepspeed --num_gpus N $(which fastcap-train) ...` for more).",
    )
    p.add_argument("--preset", default="shapes-tiny", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--config", help="YAML or JSON file of config values (applied after the preset)")
    p.add_argument("--data", help="dataset as kind:path, e.g. shapes:data/shapes")
    p.add_argument("--image-root", help="image folder for karpathy data")
    p.add_argument("--out", help="run folder")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument(
        "--scst",
        action="store_true",
        help="self-critical fine-tuning (CIDEr-D reward) of the run given by --init",
    )
    p.add_argument(
        "--init",
        metavar="RUN_DIR",
        help="start from this finished run's weights, tokenizer and config (with --scst)",
    )
    p.add_argument("--epochs", type=float)
    p.add_argument("--steps", type=int, help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--wandb", choices=["online", "offline", "disabled"])
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print parameters, FLOPs, memory and time per epoch of the configured run, then "
        "exit (builds the model on the meta device; no data, run folder or DeepSpeed)",
    )
    p.add_argument(
        "--plan-mfu",
        type=float,
        default=None,
        help="model FLOPs utilisation the --plan times assume (default 0.35)",
    )
    p.add_argument(
        "--plan-gpu",
        metavar="GPU",
        help="plan for this GPU: t4, l4, a10, a100 or h100, or N of them as NxGPU (2xt4): its "
        "precision, the memory a rank needs against the card's, the time at its peak",
    )
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="any config field, e.g. model.width=256 tf.schedule=linear tf.end=0.8",
    )
    return p


def scst_start(args, overrides: list[str]) -> tuple[dict, list[str]]:
    """The initial run's config as the base, then SCST_DEFAULTS, then the command line."""
    if not (args.scst and args.init):
        raise ConfigError("--scst and --init RUN_DIR go together: SCST fine-tunes a trained run")
    from pathlib import Path

    init = Path(args.init)
    if not (init / "config.json").is_file():
        raise ConfigError(f"--init {init}: no config.json; give a fastcap-train --out folder")
    base = json.loads((init / "config.json").read_text())
    first = [f"{k}={v}" for k, v in SCST_DEFAULTS.items()]
    first += [f"scst.init={init}", f"out={init.with_name(init.name + '-scst')}"]
    return base, first + overrides


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    flags = {
        "data.data": args.data,
        "data.image_root": args.image_root,
        "out": args.out,
        "epochs": args.epochs,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "optim.lr": args.lr,
        "seed": args.seed,
        "wandb": args.wandb,
        "checkpointing": True if args.checkpointing else None,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    try:
        base = None
        if args.resume:  # continue with the run's own config; overrides still apply on top
            from fastcap.train.checkpoint import check_run_dir

            base = json.loads((check_run_dir(args.resume) / "config.json").read_text())
        elif args.scst or args.init:
            base, overrides = scst_start(args, overrides)
        cfg = build(args.preset, args.config, overrides, base=base)
        if args.plan:
            from fastcap.plan import DEFAULT_MFU, format_plan, make_plan

            mfu = DEFAULT_MFU if args.plan_mfu is None else args.plan_mfu
            print(format_plan(make_plan(cfg, mfu=mfu, gpu=args.plan_gpu)))
            return 0
        from fastcap.train.checkpoint import CheckpointError
        from fastcap.train.loop import NonFiniteError, Trainer

        trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, DataError, TrunkWeightsError) as e:
        print(f"fastcap-train: error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.run()
    except KeyboardInterrupt:
        return 130
    except (ConfigError, DataError, TrunkWeightsError) as e:
        print(f"fastcap-train: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointError) as e:
        print(f"fastcap-train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
