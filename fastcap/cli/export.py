"""fastcap-export RUN_DIR --out DIR: write an inference bundle (see :mod:`fastcap.bundle`).

The bundle holds ``model.safetensors``, ``model_config.json`` and ``tokenizer.json``: what
``fastcap.load``, fastcap-caption, fastcap-eval and fastcap-serve need, without DeepSpeed or the
training config. RUN_DIR may also be a bundle (to copy it, or to change ``--dtype``). Bad
arguments or folders: exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastcap-export", description="Write an inference bundle of a trained fastcap run."
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="the --out folder of a fastcap-train run (or a bundle)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder (created)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="store the weights in this dtype (default: as trained, fp32)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from fastcap.bundle import FILES
    from fastcap.runs import RunError, export

    try:
        out = export(args.run_dir, args.out, args.dtype)
    except (RunError, OSError) as e:
        print(f"fastcap-export: error: {e}", file=sys.stderr)
        return 2
    size = sum((Path(out) / name).stat().st_size for name in FILES)
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
