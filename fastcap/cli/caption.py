"""fastcap-caption RUN_DIR IMAGE [IMAGE ...]: caption image files, folders or globs.

RUN_DIR is a run folder or a bundle (``fastcap-export``); :mod:`fastcap.runs` tells them apart.

Prints ``PATH<TAB>CAPTION`` per image (one line per returned sequence), or with ``--json`` a
JSON list with scores. Unreadable images are reported on stderr with their path and the others
are still captioned; the exit code is then 1. Bad arguments or run folders: exit code 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """The decoding knobs shared by fastcap-caption and fastcap-eval."""
    from fastcap.generate import STRATEGIES

    g = p.add_argument_group("decoding")
    g.add_argument("--strategy", default="greedy", help=f"one of {', '.join(STRATEGIES)}")
    g.add_argument("--num-beams", type=int, default=3, help="beam: beams per image")
    g.add_argument(
        "--length-penalty", type=float, default=0.6, help="beam: alpha of ((5+len)/6)^alpha"
    )
    g.add_argument(
        "--no-early-stopping",
        action="store_true",
        help="beam: search until no live beam can win (exact) instead of stopping at K finished",
    )
    g.add_argument("--num-return-sequences", type=int, default=1, help="beam/sample: per image")
    g.add_argument("--top-p", type=float, default=0.9, help="sample: nucleus mass in (0, 1]")
    g.add_argument("--top-k", type=int, default=0, help="sample: keep k best tokens (0: all)")
    g.add_argument("--temperature", type=float, default=1.0, help="sample: > 0")
    g.add_argument("--seed", type=int, default=0, help="sample: random seed")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: model max_len - 1")
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0; 1 disables")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 disables")
    g.add_argument("--batch-size", type=int, default=64, help="images per decoding batch")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="default: bf16 from compute capability 8.0, fp16 on a T4 / V100, fp32 on a CPU",
    )


def decoding_kwargs(args: argparse.Namespace) -> dict:
    """Validated keyword arguments of :func:`fastcap.generate.generate` (ValueError if bad)."""
    from fastcap.generate import check_controls

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_controls(
        strategy=args.strategy,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        top_p=args.top_p,
        top_k=args.top_k,
        temperature=args.temperature,
        length_penalty=args.length_penalty,
        seed=args.seed,
    )
    kw = {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
    }
    if args.strategy == "beam":
        kw.update(
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            early_stopping=not args.no_early_stopping,
            num_return_sequences=args.num_return_sequences,
        )
    elif args.strategy == "sample":
        kw.update(
            top_p=args.top_p,
            top_k=args.top_k,
            temperature=args.temperature,
            seed=args.seed,
            num_return_sequences=args.num_return_sequences,
        )
    return kw


def expand_inputs(items: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their image files, sorted) and globs -> (paths, [(item, why)] missing)."""
    paths: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                missing.append((item, "folder holds no image files"))
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item) if Path(f).is_file())
            if not found:
                missing.append((item, "pattern matches no file"))
            paths.extend(found)
        else:
            missing.append((item, "no such file or folder"))
    return paths, missing


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastcap-caption", description="Caption images with a trained fastcap run."
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="the --out folder of a fastcap-train run, or a bundle written by fastcap-export",
    )
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files, folders or globs")
    p.add_argument("--json", action="store_true", help="print JSON with scores")
    p.add_argument(
        "--attention-maps",
        metavar="OUT_DIR",
        help="write a PNG per image: the caption and the cross-attention of each word",
    )
    add_decoding_args(p)
    return p


def _fail(msg: str) -> int:
    print(f"fastcap-caption: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        kw = decoding_kwargs(args)
    except ValueError as e:
        return _fail(str(e))
    import torch

    from fastcap.data.images import read_image
    from fastcap.generate import decode_texts, derive_seeds, generate
    from fastcap.runs import RunError, load_run

    try:
        model, tokenizer, _ = load_run(args.run_dir, args.device, args.dtype)
    except RunError as e:
        return _fail(str(e))
    paths, missing = expand_inputs(args.images)
    failed = 0
    for item, why in missing:
        print(f"fastcap-caption: {item}: {why}", file=sys.stderr)
        failed += 1
    size = model.cfg.image_size
    good: list[tuple[Path, torch.Tensor]] = []
    for path in paths:
        try:
            good.append((path, read_image(path, size)))
        except (RuntimeError, OSError, ValueError) as e:
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            print(f"fastcap-caption: {path}: cannot read image ({why})", file=sys.stderr)
            failed += 1
    device = next(model.parameters()).device
    R = kw.get("num_return_sequences", 1)
    # sampling: each image its own stream (its index in the command line), as fastcap.load's
    # caption(..., seed=) and the server draw: the captions do not depend on --batch-size
    seeds = derive_seeds(kw.pop("seed"), len(good)) if args.strategy == "sample" else None
    records = []
    names: dict[str, int] = {}  # PNG stems written so far (two cat.jpg -> cat.png, cat_2.png)
    for s in range(0, len(good), args.batch_size):
        chunk = good[s : s + args.batch_size]
        images = torch.stack([u8 for _, u8 in chunk]).to(device)  # uint8: model normalises
        rows = {}
        if seeds is not None:
            rows["row_seeds"] = torch.tensor(seeds[s : s + len(chunk)], device=device)
        gen = generate(model, images, strategy=args.strategy, **kw, **rows)
        texts = decode_texts(tokenizer, gen)
        for b, (path, _) in enumerate(chunk):
            caps = [
                {"caption": texts[b * R + r], "score": float(gen.scores[b * R + r])}
                for r in range(R)
            ]
            records.append({"image": str(path), "captions": caps})
            if not args.json:
                for c in caps:
                    print(f"{path}\t{c['caption']}", flush=True)
        if args.attention_maps:
            _write_maps(args.attention_maps, model, tokenizer, images, chunk, gen, R, names)
    if args.json:
        print(json.dumps(records, indent=2))
    return 1 if failed else 0


def _write_maps(out_dir, model, tokenizer, images, chunk, gen, R, names: dict) -> None:
    """The best sequence of each image of the batch -> OUT_DIR/<stem>.png."""
    from PIL import Image

    from fastcap.attention_maps import MAIN, write_maps
    from fastcap.data.images import read_image

    display = [
        Image.fromarray(read_image(path, MAIN).permute(1, 2, 0).numpy()) for path, _ in chunk
    ]
    out = Path(out_dir)
    paths = []
    for path, _ in chunk:
        stem = path.stem
        names[stem] = names.get(stem, 0) + 1
        paths.append(out / (f"{stem}.png" if names[stem] == 1 else f"{stem}_{names[stem]}.png"))
    write_maps(model, tokenizer, images, display, gen.tokens[::R], gen.lens[::R], paths)


if __name__ == "__main__":
    sys.exit(main())
