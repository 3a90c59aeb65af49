"""fastcap-serve PATH [--host 127.0.0.1] [--port 8000]: the web page and JSON API over a model.

PATH is a run folder or a bundle. ``/`` is a page to caption an uploaded or dropped image,
``POST /v1/captions`` the JSON API, ``GET /healthz`` the model, limits and batching so far,
``/docs`` the OpenAPI documentation (see :mod:`fastcap.serve.app`). Bad arguments or folders:
exit code 2 before anything listens.
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    from fastcap.serve.app import Limits

    d = Limits()
    p = argparse.ArgumentParser(
        prog="fastcap-serve", description="Serve a trained fastcap model over HTTP."
    )
    p.add_argument(
        "path", metavar="PATH", help="a fastcap-train run folder or a fastcap-export bundle"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every one)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="default: bf16 from compute capability 8.0, fp16 on a T4 / V100, fp32 on a CPU",
    )
    b = p.add_argument_group("batching")
    b.add_argument("--batch-size", type=int, default=None, help="rows per decoding batch")
    b.add_argument("--max-batch", type=int, default=None, help="images per batch of requests")
    b.add_argument(
        "--window-ms", type=float, default=10.0, help="how long a request waits for others"
    )
    b.add_argument("--max-queue", type=int, default=256, help="images waiting before 503")
    g = p.add_argument_group("limits")
    g.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20)
    g.add_argument(
        "--max-pixels", type=int, default=d.max_pixels, help="of one image (its first frame)"
    )
    g.add_argument(
        "--max-decodes",
        type=int,
        default=d.max_concurrent_decodes,
        help="images decoded at once (each allocates at most max-pixels x 12 bytes)",
    )
    g.add_argument("--max-images", type=int, default=d.max_images, help="per request")
    g.add_argument("--max-beams", type=int, default=d.max_beams)
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("max_images", "max_beams", "max_pixels", "max_queue", "max_decodes"):
        if getattr(args, name) < 1:
            print(f"fastcap-serve: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    import uvicorn

    import fastcap
    from fastcap.serve.app import Limits, create_app

    try:
        cap = fastcap.load(args.path, args.device, args.dtype, batch_size=args.batch_size)
        limits = Limits(
            max_upload_bytes=int(args.max_upload_mb * 2**20),
            max_pixels=args.max_pixels,
            max_images=args.max_images,
            max_beams=args.max_beams,
            max_concurrent_decodes=args.max_decodes,
        )
        app = create_app(
            cap,
            limits=limits,
            max_batch=args.max_batch,
            window_ms=args.window_ms,
            max_queue=args.max_queue,
        )
    except (ValueError, RuntimeError) as e:
        print(f"fastcap-serve: error: {e}", file=sys.stderr)
        return 2
    print(f"fastcap-serve: {cap} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
