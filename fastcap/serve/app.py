"""The FastAPI app of fastcap-serve: a web page, ``POST /v1/captions``, ``GET /healthz``.

``create_app(captioner)`` builds it around an :class:`fastcap.api.ImageCaptioner`. A request
is read by the framework (asynchronously: a slow upload holds only its own connection), its
images are checked and decoded in the framework's thread pool (by the one bounded decoder of
:mod:`fastcap.data.images`: the header first, one frame, the crop before the resize; at most
``Limits.max_concurrent_decodes`` at once), and the captioning runs in the
:class:`~fastcap.serve.batcher.Batcher`'s worker thread, batched with the other requests that
arrive within the window and share the options.

What one request can cost is bounded before anything is decoded: its body (``max_upload_bytes``),
its images (``max_images``), each image's pixels from its header (``max_pixels``), so each decode
allocates at most ``max_decode_bytes`` = ``max_pixels`` x
:data:`~fastcap.data.images.DECODE_BYTES_PER_PIXEL`, and at most ``max_concurrent_decodes`` run at
once: the decoders' memory is bounded by their product, whatever the clients send.

Every answer that is not a 200 is ``{"error": "..."}`` with a status that says whose fault it
is: 400 malformed body or base64, 413 too large (body bytes, pixels, images per request), 415
not an image or an unsupported content type, 422 an unknown or bad option or no image, 503 the
queue is full, 500 a bug (logged with its traceback; the server goes on).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastcap import __version__
from fastcap.api import OPTION_NAMES, Caption, DecodeOptions, ImageCaptioner, Prepared
from fastcap.data.images import ImageError, decode_bytes_limit, decode_rgb
from fastcap.generate import derive_seeds
from fastcap.serve.batcher import Batcher, Overloaded

log = logging.getLogger("fastcap.serve")


@dataclass
class Limits:
    """What one request may ask for; each limit has its own clear 4xx answer."""

    max_upload_bytes: int = 16 * 2**20
    """Request body size (413); checked from Content-Length before reading, and while reading."""
    max_pixels: int = 4096 * 4096
    """Width x height of one image (its first frame: the only one decoded), read from its
    header before it is decoded (413)."""
    max_concurrent_decodes: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    """Images decoded at once, across requests (the others wait their turn)."""
    max_images: int = 16
    """Images in one request (413)."""
    max_beams: int = 8
    """num_beams (422)."""
    max_new_tokens: int | None = None
    """max_new_tokens and min_new_tokens (422); None: the model's max_len - 1."""


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------- request / response
class Options(BaseModel):
    """Decoding options: form fields beside the files, or keys beside ``images`` in JSON."""

    model_config = ConfigDict(extra="forbid")

    # the defaults are the Python API's (one place: fastcap.api.DecodeOptions)
    strategy: Literal["greedy", "beam", "sample"] = DecodeOptions.strategy
    num_beams: int = DecodeOptions.num_beams
    length_penalty: float = DecodeOptions.length_penalty
    top_p: float = DecodeOptions.top_p
    top_k: int = DecodeOptions.top_k
    temperature: float = DecodeOptions.temperature
    seed: int | None = DecodeOptions.seed
    max_new_tokens: int | None = DecodeOptions.max_new_tokens
    min_new_tokens: int = DecodeOptions.min_new_tokens
    repetition_penalty: float = DecodeOptions.repetition_penalty
    no_repeat_ngram_size: int = DecodeOptions.no_repeat_ngram_size
    attention_maps: bool = False
    """Add each caption's attention-map picture as a PNG data URL."""


class CaptionRequest(Options):
    """The JSON form of a request."""

    images: list[str]
    """Encoded image files as base64, or as data URLs (data:image/png;base64,...)."""


class CaptionOut(BaseModel):
    caption: str
    logprob: float
    score: float
    tokens: list[int]
    attention_map: str | None = None


class BatchOut(BaseModel):
    requests: int
    images: int


class CaptionResponse(BaseModel):
    captions: list[CaptionOut]
    options: dict
    batch: BatchOut
    seconds: float


class ErrorResponse(BaseModel):
    error: str


assert set(Options.model_fields) - {"attention_maps"} == set(OPTION_NAMES)
VALID = ", ".join(Options.model_fields)

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        **{
            k: {k2: v2 for k2, v2 in v.items() if k2 != "title"}
            for k, v in Options.model_json_schema()["properties"].items()
        },
    },
}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": CaptionRequest.model_json_schema()},
        },
    }
}


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        name = ".".join(str(x) for x in err["loc"]) or "body"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown option {name!r}; valid options: {VALID}")
        else:
            parts.append(f"{name}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------- the body size limit
class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, by its Content-Length
    before anything is read, or while it streams in (chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self, n: int | None) -> str:
        size = f"{n} bytes" if n is not None else "more"
        return f"request body is {size}; this server takes at most {self.max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await JSONResponse({"error": "bad Content-Length"}, 400)(
                    scope, receive, send
                )
            if n > self.max_bytes:
                resp = JSONResponse(
                    {"error": self._message(n)}, 413, headers={"Connection": "close"}
                )
                return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, self._message(None))
            return msg

        await self.app(scope, limited, send)


# ---------------------------------------------------------------------- reading a request
async def _read_multipart(request: Request, limits: Limits) -> tuple[list, dict]:
    try:
        form = await request.form(
            max_files=limits.max_images + 1, max_fields=len(Options.model_fields) + 8
        )
    except StarletteHTTPException as e:
        if "Too many files" in str(e.detail):
            raise ApiError(413, f"at most {limits.max_images} images per request") from None
        raise ApiError(400, f"malformed multipart body: {e.detail}") from None
    try:
        blobs, raw = [], {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "images":
                    raise ApiError(422, f"unknown file field {key!r}; send images as 'images'")
                blobs.append((value.filename or f"images[{len(blobs)}]", await value.read()))
            elif key == "images":
                raise ApiError(422, "'images' must be files (multipart) or base64 strings (JSON)")
            elif key in raw:
                raise ApiError(422, f"option {key!r} given twice")
            elif value != "":  # an empty form field means the default
                raw[key] = value
        return blobs, raw
    finally:
        await form.close()


async def _read_json(request: Request) -> tuple[list, dict]:
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(data).__name__}")
    images = data.pop("images", None)
    if images is None:
        raise ApiError(422, "no images: give 'images', a list of base64-encoded image files")
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise ApiError(422, "'images' must be a list of base64 strings")
    blobs = []
    for i, s in enumerate(images):
        if s.startswith("data:"):
            s = s.partition(",")[2]
        try:
            blobs.append((f"images[{i}]", base64.b64decode(s, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(400, f"images[{i}]: not valid base64") from None
    return blobs, data


def _options(raw: dict, limits: Limits, cap: ImageCaptioner) -> tuple[DecodeOptions, bool]:
    try:
        o = Options.model_validate(raw)
    except ValidationError as e:
        raise ApiError(422, _validation_message(e)) from None
    try:
        opts = DecodeOptions(**{k: getattr(o, k) for k in OPTION_NAMES})
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    if opts.strategy == "beam" and opts.num_beams > limits.max_beams:
        raise ApiError(
            422, f"num_beams is {opts.num_beams}; this server allows <= {limits.max_beams}"
        )
    most = limits.max_new_tokens or cap.max_new_tokens
    for name in ("max_new_tokens", "min_new_tokens"):
        v = getattr(opts, name)
        if v is not None and v > most:
            raise ApiError(422, f"{name} is {v}; this server allows <= {most}")
    return opts, o.attention_maps


def _prepare(
    cap: ImageCaptioner,
    blobs: list,
    attention: bool,
    limits: Limits,
    gate: threading.Semaphore,
    opts: DecodeOptions,
) -> list[Prepared]:
    """Decode each image (in a pool thread) by the bounded decoder: header checked first (413
    over ``max_pixels``, 415 not an image), one frame, at most ``gate``'s count at once. A
    seeded sampling request gives each image its own seed (so any batch gives its caption)."""
    seeds = [None] * len(blobs)
    if opts.strategy == "sample" and opts.seed is not None:
        seeds = derive_seeds(opts.seed, len(blobs))
    out = []
    for i, (name, data) in enumerate(blobs):
        label = name if name == f"images[{i}]" else f"images[{i}] ({name})"
        if not data:
            raise ApiError(415, f"{label}: empty file, not an image")
        try:
            with gate:
                u8 = decode_rgb(data, max_pixels=limits.max_pixels)
        except ImageError as e:
            raise ApiError(e.status, f"{label}: {e}") from None
        try:
            p = cap.prepare(u8, attention=attention)
        except ValueError as e:
            raise ApiError(415, f"{label}: {e}") from None
        p.seed = seeds[i]
        out.append(p)
    return out


def _png_data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _caption_out(c: Caption) -> dict:
    d = {"caption": c.text, "logprob": c.logprob, "score": c.score, "tokens": c.tokens}
    if c.attention is not None:
        d["attention_map"] = _png_data_url(c.attention)
    return d


# ---------------------------------------------------------------------- the app
def create_app(
    captioner: ImageCaptioner,
    *,
    limits: Limits | None = None,
    max_batch: int | None = None,
    window_ms: float = 10.0,
    max_queue: int = 256,
) -> FastAPI:
    """The app. ``max_batch``: images per device batch (default the captioner's batch size);
    ``window_ms``: how long the oldest waiting request waits for others; ``max_queue``: images
    waiting before 503."""
    limits = limits or Limits()
    cap = captioner

    def run(key, items: list[Prepared]) -> list[Caption]:
        opts, attention = key
        return cap.caption_prepared(items, opts, attention=attention)

    batcher = Batcher(
        run, max_batch=max_batch or cap.batch_size, window_s=window_ms / 1000, max_queue=max_queue
    )

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        log.info("fastcap-serve: %s", cap)
        yield
        batcher.stop()

    app = FastAPI(
        title="fastcap",
        summary="Caption images with a trained fastcap model.",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.batcher, app.state.captioner, app.state.limits = batcher, cap, limits
    gate = threading.BoundedSemaphore(limits.max_concurrent_decodes)
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse({"error": e.message}, e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return JSONResponse({"error": msg}, 422)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(e).__name__}: {e})"}, 500)

    page = (resources.files("fastcap.serve") / "static" / "index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness, the model, the limits and the batching so far."""
        return {
            "status": "ok",
            "model": cap.info(),
            "limits": {
                **asdict(limits),
                "max_new_tokens": limits.max_new_tokens or cap.max_new_tokens,
                "max_decode_bytes": decode_bytes_limit(limits.max_pixels),
                "frames_decoded": 1,
            },
            "batching": batcher.stats(),
        }

    errors = {s: {"model": ErrorResponse} for s in (400, 413, 415, 422, 500, 503)}

    @app.post(
        "/v1/captions",
        response_model=CaptionResponse,
        openapi_extra=_OPENAPI_BODY,
        responses=errors,
    )
    async def captions(request: Request):
        """Caption one or more images: multipart/form-data with files in ``images`` and the
        options as fields, or JSON ``{"images": [base64, ...], <options>}``."""
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            blobs, raw = await _read_multipart(request, limits)
        elif ctype == "application/json":
            blobs, raw = await _read_json(request)
        else:
            raise ApiError(
                415,
                f"content type {ctype or 'none'!r}: send multipart/form-data (files in "
                "'images') or application/json ({'images': [base64, ...]})",
            )
        opts, attention = _options(raw, limits, cap)
        if not blobs:
            raise ApiError(422, "no images: send at least one in 'images'")
        if len(blobs) > limits.max_images:
            raise ApiError(
                413, f"{len(blobs)} images; this server takes at most {limits.max_images} a request"
            )
        prepared = await run_in_threadpool(_prepare, cap, blobs, attention, limits, gate, opts)
        try:  # the seed travels with each image: requests of any seed share a batch
            results, info = await batcher.submit((replace(opts, seed=None), attention), prepared)
        except Overloaded as e:
            raise ApiError(503, str(e)) from None
        # PNG encoding takes milliseconds a picture: not on the event loop
        out = await run_in_threadpool(lambda: [_caption_out(c) for c in results])
        return {
            "captions": out,
            "options": asdict(opts),
            "batch": asdict(info),
            "seconds": round(time.perf_counter() - t0, 4),
        }

    return app
