"""Fuzzing the whole image path with hostile inputs drawn from a fresh seed (printed; replay with
FASTCAP_TEST_SEED=N): random bytes, truncated and bit-flipped PNG/JPEG/GIF/WebP/BMP/TIFF,
1 x 1, 1 x N and N x 1, 16-bit, palette, CMYK, EXIF-rotated, multi-frame, and decompression
bombs (headers claiming 100,000^2 pixels; a real 4096^2 PNG of 50 KB).

- the readers: the bounded decoder gives (3, S, S) uint8 or an ImageError, nothing else; a
  shard of them streams to the end, every bad one counted;
- fastcap-serve (a real process on loopback): every input as a request, 4 clients at once;
  never a 5xx, still serving; its peak RSS over the run (VmHWM, reset after start-up) stays
  under start-up + max_decodes x max_decode_bytes + 256 MiB; then schemathesis on the server's
  own /openapi.json (not_a_server_error).

FASTCAP_FUZZ_N sets the number of inputs (default 120: the CI run, well under a minute)."""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fastcap.data import images
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.data.wds import WdsSet

N = int(os.environ.get("FASTCAP_FUZZ_N") or 120)
S = 16


# ---------------------------------------------------------------------- hostile inputs
def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header says w x h (8-bit RGB) over a few KB of zeros: a bomb by its header."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 200_000, 9)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def _picture(rng: random.Random, w: int, h: int, mode: str = "RGB") -> Image.Image:
    a = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


def _frames(rng, fmt: str) -> bytes:
    w, h, n = rng.randint(1, 64), rng.randint(1, 64), rng.randint(2, 12)
    fr = [_picture(rng, w, h) for _ in range(n)]
    if fmt == "GIF":
        fr = [f.convert("P") for f in fr]
    return _enc(fr[0], fmt, save_all=True, append_images=fr[1:])


def _exif_rotated(rng) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = rng.choice([3, 6, 8])
    return _enc(_picture(rng, rng.randint(8, 60), rng.randint(8, 60)), "JPEG", exif=ex.tobytes())


def _gray16(rng) -> np.ndarray:
    return np.full((rng.randint(1, 40), rng.randint(1, 40)), rng.randrange(65536), np.uint16)


def _sized(rng) -> tuple[int, int]:
    return rng.choice([(1, 1), (1, rng.randint(2, 5000)), (rng.randint(2, 5000), 1),
                       (rng.randint(1, 80), rng.randint(1, 80))])  # fmt: skip


GOOD = {
    "png": lambda r: _enc(_picture(r, *_sized(r)), "PNG"),
    "jpeg": lambda r: _enc(_picture(r, *_sized(r)), "JPEG", quality=r.randint(5, 95)),
    "gif": lambda r: _enc(_picture(r, *_sized(r), "P"), "GIF"),
    "webp": lambda r: _enc(_picture(r, *_sized(r)), "WEBP"),
    "bmp": lambda r: _enc(_picture(r, *_sized(r)), "BMP"),
    "tiff": lambda r: _enc(_picture(r, *_sized(r)), "TIFF"),
    "png-palette": lambda r: _enc(_picture(r, *_sized(r), "P"), "PNG"),
    "png-gray-alpha": lambda r: _enc(_picture(r, *_sized(r), "LA"), "PNG"),
    "png-16bit": lambda r: _enc(Image.fromarray(_gray16(r)), "PNG"),
    "jpeg-cmyk": lambda r: _enc(_picture(r, *_sized(r), "CMYK"), "JPEG"),
    "jpeg-exif-rotated": _exif_rotated,
    "gif-animated": lambda r: _frames(r, "GIF"),
    "png-animated": lambda r: _frames(r, "PNG"),
    "webp-animated": lambda r: _frames(r, "WEBP"),
    "tiff-pages": lambda r: _frames(r, "TIFF"),
}


def hostile(rng: random.Random) -> tuple[str, bytes]:
    """One input: (kind, bytes)."""
    roll = rng.random()
    if roll < 0.08:
        return "random-bytes", rng.randbytes(rng.randint(0, 4000))
    if roll < 0.14:
        kind = rng.choice(["png-claims-100000^2", "png-claims-5000x4000", "gif-claims-65535^2",
                           "jpeg-claims-65500^2"])  # fmt: skip
        if kind.startswith("png"):
            return kind, png_claiming(*((100_000, 100_000) if "100000" in kind else (5000, 4000)))
        if kind.startswith("gif"):
            b = bytearray(_enc(_picture(rng, 8, 8, "P"), "GIF"))
            b[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen
            return kind, bytes(b)
        b = bytearray(_enc(_picture(rng, 8, 8), "JPEG"))
        i = b.find(b"\xff\xc0")
        b[i + 5 : i + 9] = struct.pack(">HH", 65500, 65500)  # SOF0 height, width
        return kind, bytes(b)
    kind = rng.choice(list(GOOD))
    data = GOOD[kind](rng)
    roll = rng.random()
    if roll < 0.3:
        return f"{kind}-truncated", data[: rng.randint(0, max(0, len(data) - 1))]
    if roll < 0.45:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return f"{kind}-bitflip", bytes(b)
    return kind, data


def inputs(seed: int, n: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = [hostile(rng) for _ in range(n)]
    # always: the bomb at the limit (a real 4096^2 PNG: 48 MiB decoded from ~50 KB)
    out.append(("png-4096^2-zeros", _enc(Image.new("RGB", (4096, 4096)), "PNG")))
    return out


# ---------------------------------------------------------------------- the readers
def test_readers_decode_or_refuse_every_hostile_input(tmp_path, test_seed):
    print(f"FASTCAP_TEST_SEED={test_seed} ({N} inputs)")
    got = collections.Counter()
    samples = []
    for i, (kind, data) in enumerate(inputs(test_seed, N)):
        try:
            x = images.decode_bytes(data, S, max_pixels=4096 * 4096)
            assert x.shape == (3, S, S) and x.dtype == torch.uint8, kind
            got["decoded"] += 1
        except images.ImageError as e:
            assert "\n" not in str(e), (kind, e)
            got[type(e).__name__] += 1
        samples.append((f"k{i:05d}", {"jpg": data, "txt": kind.encode()}))
    print(f"readers: {dict(got)}")
    assert got["decoded"] and got["NotAnImage"]
    with tarfile.open(tmp_path / "train-0.tar", "w") as tf:
        for key, members in samples:
            for ext, blob in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    tok = CaptionTokenizer.train(list(GOOD) * 3, 64)
    ws = WdsSet(str(tmp_path / "train-0.tar"), "train", tok, S, 12, world=1, max_bad_fraction=1.0)
    batches = list(ws.batches(0, 0, 8, seed=test_seed % 1000))
    assert len(batches) == ws.steps_per_epoch(8)
    assert len(ws.bad) >= got["NotAnImage"] - 8  # (the last partial batch is not read)


# ---------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def server(tiny_run):
    port = _free_port()
    exe = Path(sys.executable).parent / "fastcap-serve"
    proc = subprocess.Popen(
        [
            str(exe),
            str(tiny_run),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-decodes",
            "2",
            "--log-level",
            "error",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            httpx.get(url + "/healthz", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() - t0 < 120, "fastcap-serve did not come up"
            time.sleep(0.2)
    yield proc, url
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)


def test_the_server_never_answers_5xx_and_its_memory_is_bounded(server, test_seed):
    proc, url = server
    limits = httpx.get(url + "/healthz").json()["limits"]
    # warm (the first request loads lazily what the rest reuse), then reset the peak
    warm = _enc(Image.new("RGB", (64, 48), (9, 9, 9)), "PNG")
    assert httpx.post(url + "/v1/captions", files=[("images", ("w.png", warm))]).status_code == 200
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
    start = _hwm_mib(proc.pid)
    todo = inputs(test_seed + 1, N)
    statuses: collections.Counter = collections.Counter()
    by_kind: dict = collections.defaultdict(collections.Counter)
    fives = []
    lock = threading.Lock()
    rng = random.Random(test_seed)
    jobs = [(kind, data, rng.random() < 0.3, rng.choice(["greedy", "beam", "sample"]))
            for kind, data in todo]  # fmt: skip

    def client(part):
        with httpx.Client(timeout=120) as c:
            for kind, data, as_json, strategy in part:
                if as_json:
                    body = {"images": [base64.b64encode(data).decode()], "strategy": strategy}
                    r = c.post(url + "/v1/captions", json=body)
                else:
                    r = c.post(url + "/v1/captions", files=[("images", ("f", data))],
                               data={"strategy": strategy})  # fmt: skip
                with lock:
                    statuses[r.status_code] += 1
                    by_kind[kind][r.status_code] += 1
                    if r.status_code >= 500:
                        fives.append((kind, r.text[:300]))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(jobs[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    dt = time.monotonic() - t0
    peak = _hwm_mib(proc.pid)
    bound = start + limits["max_concurrent_decodes"] * limits["max_decode_bytes"] / 2**20 + 256
    answers = dict(sorted(statuses.items()))
    print(f"server fuzz: {len(jobs)} inputs in {dt:.1f} s, answers by status {answers}")
    print(f"server peak RSS {peak:.0f} MiB (after start-up {start:.0f} MiB; bound {bound:.0f})")
    print(json.dumps({k: dict(v) for k, v in sorted(by_kind.items())}))
    assert not fives, fives[:5]
    assert sum(statuses.values()) == len(jobs)
    assert httpx.get(url + "/healthz").json()["status"] == "ok" and proc.poll() is None
    assert peak <= bound


@pytest.mark.skipif(shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None,
                    reason="schemathesis is not installed (pip install -e .[dev])")  # fmt: skip
def test_schemathesis_finds_no_server_error(server, tmp_path):
    _, url = server
    exe = Path(sys.executable).parent / "schemathesis"
    n = max(10, N // 6)
    r = subprocess.run(
        [
            str(exe),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            str(n),
            "--request-timeout",
            "60",
            "--no-color",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # its .schemathesis/ cache goes there, not into the checkout
    )
    tail = "\n".join(r.stdout.splitlines()[-25:])
    print(tail)
    assert r.returncode == 0, tail
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
