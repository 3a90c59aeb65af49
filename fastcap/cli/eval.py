"""fastcap-eval RUN_DIR [--split test] [--data kind:path]: decode a split and score it.

RUN_DIR is a run folder or a bundle (``fastcap-export``); a bundle needs ``--data``.

Prints and writes (``--out``, default RUN_DIR/eval_<split>_<strategy>.json) BLEU-1..4, METEOR,
ROUGE-L, CIDEr-D, the shapes semantic score when the data is shapes, the share of distinct
captions, and image<->text retrieval recall@1/@5; writes the captions in the COCO results
format (``--results``, default RUN_DIR/captions_<split>_<strategy>.json). Bad arguments, data
or run folders: exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastcap.cli.caption import add_decoding_args, decoding_kwargs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcap-eval", description="Score a trained fastcap run.")
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="the --out folder of a fastcap-train run, or a bundle written by fastcap-export",
    )
    p.add_argument("--split", default="test", help="split of the data to decode (default test)")
    p.add_argument(
        "--data", help="dataset as kind:path (default: the run's training data; a bundle needs it)"
    )
    p.add_argument("--image-root", help="image folder for karpathy data")
    p.add_argument("--limit", type=int, help="decode only the first N images of the split")
    p.add_argument("--no-retrieval", action="store_true", help="skip retrieval recall")
    p.add_argument("--out", help="metrics JSON path")
    p.add_argument("--results", help="captions JSON path (COCO results format)")
    p.add_argument("--no-progress", action="store_true")
    add_decoding_args(p)
    return p


def _fail(msg: str) -> int:
    print(f"fastcap-eval: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        kw = decoding_kwargs(args)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
    except ValueError as e:
        return _fail(str(e))
    from fastcap.data.captionset import CaptionSet
    from fastcap.data.records import DataError
    from fastcap.data.sources import load_split_records, open_split
    from fastcap.runs import RunError, load_run
    from fastcap.train.evaluate import coco_results, evaluate_split

    try:
        model, tokenizer, cfg = load_run(args.run_dir, args.device, args.dtype)
        if cfg is None and not args.data:  # a bundle carries no training config
            raise RunError(
                f"{args.run_dir} is a bundle, which does not name its training data; "
                "give the split's data with --data kind:path"
            )
        spec = args.data or cfg.data.data
        root = args.image_root if args.data else (args.image_root or cfg.data.image_root)
        mc = model.cfg
        bad_fraction = getattr(cfg.data, "max_bad_fraction", 0.01) if cfg else 0.01
        if spec.startswith("wds:"):  # shards: decoded into memory as a whole
            cs = open_split(
                spec,
                args.split,
                image_root=root,
                tokenizer=tokenizer,
                image_size=mc.image_size,
                max_len=mc.max_len,
                in_memory=True,
                progress=not args.no_progress,
                max_bad_fraction=bad_fraction,
            )
        else:  # files: only the first --limit images are decoded
            recs = load_split_records(spec, args.split, root)
            if not recs:
                raise DataError(
                    f"--data {spec!r}: no images in split {args.split!r}; choose another --split"
                )
            cs = CaptionSet(
                recs[: args.limit],
                tokenizer,
                mc.image_size,
                mc.max_len,
                progress=not args.no_progress,
                max_bad_fraction=bad_fraction,
                name=args.split,
            )
    except (RunError, DataError) as e:
        return _fail(str(e))
    device = next(model.parameters()).device
    t0 = time.time()
    metrics, res = evaluate_split(
        model,
        cs,
        tokenizer,
        device=device,
        strategy=args.strategy,
        batch_size=args.batch_size,
        limit=args.limit,
        retrieval=not args.no_retrieval,
        progress=not args.no_progress,
        **kw,
    )
    metrics["images"] = len(res)
    metrics["skipped"] = len(cs.bad)
    metrics["decode_seconds"] = round(time.time() - t0, 2)
    metrics["strategy"] = args.strategy
    metrics["decoding"] = {k: v for k, v in kw.items() if v is not None}
    tag = f"{args.split}_{args.strategy}"
    out = Path(args.out or Path(args.run_dir) / f"eval_{tag}.json")
    results = Path(args.results or Path(args.run_dir) / f"captions_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    results.write_text(json.dumps(coco_results(res)))
    print(f"== {args.split} ({len(res)} images, {args.strategy}) ==")
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"  {k:18} {v:.4f}")
    print(f"wrote {out} and {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
