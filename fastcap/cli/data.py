"""``fastcap-data``: build datasets (``shapes``) and write webdataset shards (``shard``).

    fastcap-data shapes --out data/shapes [--train 20000 --val 1000 --test 1000
                        --compositional 1000 --size 64 --seed 0 --overwrite]
    fastcap-data shard --from KARPATHY_JSON|FOLDER|SPEC --out DIR --shard-size N [--split train]

Bad arguments (a negative count, ``--size`` below 32, a non-empty ``--out`` without
``--overwrite``) exit with status 2 and a message saying what to change; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _add_shapes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shapes",
        help="the synthetic shapes captioning dataset",
        description="Generate the shapes dataset (Karpathy JSON + PNGs), deterministic per seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--train", type=int, default=20000, help="training images")
    p.add_argument("--val", type=int, default=1000, help="validation images")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument(
        "--compositional",
        type=int,
        default=1000,
        help="images of held-out colour-shape pairs",
    )
    p.add_argument("--size", type=int, default=64, help="canvas side in pixels (>= 32)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--workers", type=int, default=None, help="processes (default: by size)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_shapes, parser=p)


def _run_shapes(args: argparse.Namespace) -> int:
    from fastcap.data.shapes import generate

    t0 = time.perf_counter()
    out = generate(
        args.out,
        train=args.train,
        val=args.val,
        test=args.test,
        compositional=args.compositional,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        workers=args.workers,
    )
    n = args.train + args.val + args.test + args.compositional
    print(
        f"wrote {n} images (train {args.train}, val {args.val}, test {args.test}, "
        f"compositional {args.compositional}) to {out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _add_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="write a split as webdataset tar shards",
        description="Write one split as webdataset tar shards OUT/SPLIT-000000.tar ... plus "
        "sizes.json (each shard written under a temporary name, then renamed). Read them "
        "back with --data wds:OUT/{split}-{000000..NNNNNN}.tar.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="a Karpathy JSON file, a folder with a captions file, or any kind:path spec",
    )
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--split", default="train", help="which split to write")
    p.add_argument("--image-root", default=None, help="image folder, when not the default")
    p.set_defaults(run=_run_shard, parser=p, workers=None)


def _run_shard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastcap.data.shard import write_shards
    from fastcap.data.sources import load_split_records

    src = args.source
    if Path(src).is_dir():
        spec = f"folder:{src}"
    elif Path(src).is_file():
        spec = f"karpathy:{src}"
    else:
        spec = src  # kind:path, or a missing path that parse_spec names
    if args.shard_size < 1:
        args.parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    t0 = time.perf_counter()
    recs = load_split_records(spec, args.split, args.image_root)
    if not recs:
        args.parser.error(f"{src}: no images in split {args.split!r}")
    paths, bad = write_shards(recs, args.out, shard_size=args.shard_size, split=args.split)
    n = len(recs) - len(bad)
    print(
        f"wrote {n} samples ({len(bad)} bad skipped) in {len(paths)} shards to {args.out} "
        f"in {time.perf_counter() - t0:.1f} s; read with "
        f"--data wds:{args.out}/{{split}}-{{000000..{len(paths) - 1:06d}}}.tar"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcap-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_shapes(sub)
    _add_shard(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 0:
        args.parser.error(f"--workers must be >= 0, got {args.workers}")
    from fastcap.data.records import DataError
    from fastcap.data.shapes import DatasetArgumentError

    try:
        return args.run(args)
    except (DatasetArgumentError, FileExistsError, DataError) as e:
        args.parser.error(str(e))  # exits with status 2
    except KeyboardInterrupt:
        print("fastcap-data: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 1  # unreachable: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
