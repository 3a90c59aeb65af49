"""Images that explode in memory or break a batch: every reader and the server decode one frame
through one bounded decoder (fastcap.data.images), crop before resizing, and refuse what is
over the pixel limit from its header, in milliseconds."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import fastcap
from fastcap.data import images
from fastcap.data.captionset import CaptionSet
from fastcap.data.records import Record
from fastcap.data.stream import StreamSet
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.data.wds import WdsSet
from fastcap.serve.app import Limits, create_app

S = 16


def gif(w: int, h: int, frames: int, *, first_differs: bool = True) -> bytes:
    """An animated GIF, each frame one pixel different from the one before (so no encoder folds
    them together; PIL stores each as the changed box: 60 frames of 2048 x 2048 are 5 KB). With
    ``first_differs`` the first frame is red and the others blue."""
    pal = [200, 30, 30, 30, 30, 200] + [i % 256 for i in range(6, 768)]
    out = []
    for i in range(frames):
        f = Image.new("P", (w, h), 1 if (i and first_differs) else 0)
        f.putpalette(pal)
        f.putpixel((i % w, (i // w) % h), 2 + i % 200)
        out.append(f)
    buf = io.BytesIO()
    out[0].save(buf, "GIF", save_all=True, append_images=out[1:], optimize=False)
    return buf.getvalue()


def png(w: int, h: int, color=(10, 200, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer.train(["a red square", "a blue circle"] * 20, 64)


def test_animated_gif_is_its_first_frame(tmp_path):
    data = gif(40, 24, 5)
    x = images.decode_bytes(data, S)
    assert x.shape == (3, S, S) and x.dtype == torch.uint8
    red = torch.tensor([200, 30, 30], dtype=torch.uint8)[:, None, None].expand(3, 24, 40)
    want = images.fit(red, S)
    # the first frame (red), not the later ones (blue); GIF's palette rounds by a few levels
    assert (x.int() - want.int()).abs().max() <= 8
    (tmp_path / "a.gif").write_bytes(data)
    assert torch.equal(images.read_image(tmp_path / "a.gif", S), x)


def _records(tmp_path: Path) -> list[Record]:
    files = {"still.png": png(20, 30), "anim.gif": gif(30, 20, 4), "anim2.png": gif(16, 16, 3)}
    recs = []
    for i, (name, data) in enumerate(files.items()):
        (tmp_path / name).write_bytes(data)
        recs.append(Record(i, tmp_path / name, ["a red square"], "train"))
    return recs


def test_an_animated_gif_in_a_training_set_is_one_image(tmp_path, tok):
    """main: CaptionSet died in torch.stack; StreamSet's workers in collate."""
    cs = CaptionSet(_records(tmp_path), tok, S, 12, progress=False, max_bad_fraction=0.0)
    assert cs.images.shape == (3, 3, S, S) and not cs.bad
    ss = StreamSet(_records(tmp_path), tok, S, 12, max_bad_fraction=0.0)
    (batch,) = list(ss.batches(0, 0, 3, seed=0))
    assert batch.images.shape == (3, 3, S, S) and not ss.bad


def test_an_animated_gif_in_a_shard_is_one_image(tmp_path, tok):
    with tarfile.open(tmp_path / "train-0.tar", "w") as tf:
        for key, data in [("a", png(20, 20)), ("b", gif(24, 24, 6)), ("c", png(9, 31))]:
            for ext, blob in (("jpg", data), ("txt", b"a red square")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    ws = WdsSet(f"{tmp_path}/train-0.tar", "train", tok, S, 12, world=1, max_bad_fraction=0.0)
    (batch,) = list(ws.batches(0, 0, 3, seed=0))
    assert batch.images.shape == (3, 3, S, S) and not ws.bad


_MEASURE = textwrap.dedent(
    """
    import sys, time
    from fastcap.data.images import decode_bytes

    def hwm():  # peak resident set size (MiB) since the last reset
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    data = open(sys.argv[1], "rb").read()
    decode_bytes(open(sys.argv[2], "rb").read(), 224)  # warm: the libraries' own allocations
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    before = hwm()
    t0 = time.perf_counter()
    try:
        out = tuple(decode_bytes(data, 224, max_pixels=4096 * 4096).shape)
    except TypeError:  # a decoder without the limit (main before the fix)
        out = tuple(decode_bytes(data, 224).shape)
    dt = time.perf_counter() - t0
    print(f"{out}|{hwm() - before:.1f}|{dt:.3f}")
    """
)

HOSTILE = {
    # name: (bytes, pixels of one frame, at most seconds)
    "gif-2048x2048-60-frames": (lambda: gif(2048, 2048, 60, first_differs=False), 2048**2, 1.0),
    "png-8000x4": (lambda: png(8000, 4), 8000 * 4, 0.5),
    "png-1070000x15": (lambda: png(1_070_000, 15), 1_070_000 * 15, 2.0),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_image_costs_one_bounded_frame(tmp_path, name):
    """main: the 60-frame GIF (5.6 KB) decoded to 720 MiB (60 frames); the 8000 x 4 PNG (193
    bytes) resized to 224 x 448,000 (~900 MB, 2 s); the 1,070,000 x 15 PNG to ~32 GB.

    Each runs in its own process, whose peak RSS (VmHWM, reset just before) is read after it."""
    make, pixels, most_s = HOSTILE[name]
    # the stated bound: one frame at DECODE_BYTES_PER_PIXEL, plus 8 MiB for the allocator
    most_mib = pixels * images.DECODE_BYTES_PER_PIXEL / 2**20 + 8
    (tmp_path / "x").write_bytes(make())
    (tmp_path / "warm").write_bytes(png(64, 48))
    r = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "x"), str(tmp_path / "warm")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    shape, grew, dt = r.stdout.strip().splitlines()[-1].split("|")
    print(f"{name}: {shape}, peak RSS +{grew} MiB, {dt} s")
    assert shape == "(3, 224, 224)"
    assert float(grew) <= most_mib and float(dt) <= most_s


def test_decode_limits_and_errors():
    with pytest.raises(images.ImageTooLarge, match="over the limit of 100 pixels"):
        images.decode_bytes(png(11, 10), S, max_pixels=100)
    assert images.decode_bytes(png(10, 10), S, max_pixels=100).shape == (3, S, S)
    for bad, why in [(b"", "zero-byte"), (b"not an image", "no known image format"),
                     (png(30, 30)[:60], "cannot be")]:  # fmt: skip
        with pytest.raises(images.NotAnImage, match=why):
            images.decode_bytes(bad, S)
    # a 16-bit gray PNG and a CMYK JPEG decode to RGB uint8
    buf = io.BytesIO()
    Image.fromarray(np.arange(300, dtype=np.uint16).reshape(15, 20) * 200).save(buf, "PNG")
    assert images.decode_bytes(buf.getvalue(), S).dtype == torch.uint8
    buf = io.BytesIO()
    Image.new("CMYK", (20, 10), (10, 20, 30, 40)).save(buf, "JPEG")
    assert images.decode_bytes(buf.getvalue(), S).shape == (3, S, S)


@pytest.fixture(scope="module")
def client(tiny_run):
    cap = fastcap.load(tiny_run, device="cpu")
    with TestClient(create_app(cap, limits=Limits())) as c:
        yield c


def _post(client, data: bytes, name="x.png"):
    t0 = time.perf_counter()
    r = client.post("/v1/captions", files=[("images", (name, data, "image/png"))])
    return r, time.perf_counter() - t0


def test_the_server_answers_hostile_images_fast_and_stays_up(client):
    """main: the GIF was decoded whole (60 frames, ~1 s, 720 MiB) and the strip resized to
    224 x 448,000 (~900 MB) in the request's pool thread."""
    data = gif(2048, 2048, 60, first_differs=False)
    assert len(data) < 60_000  # about 50 KB: a palette per frame
    r, dt = _post(client, data, "anim.gif")
    assert r.status_code == 200 and dt < 1.5, (r.status_code, dt)
    r, dt = _post(client, png(8000, 4))
    assert r.status_code == 200 and dt < 0.5, (r.status_code, dt)
    # over the pixel limit, found in the header: 413 at once, with the reason
    r, dt = _post(client, png(5000, 4000))
    assert r.status_code == 413 and "over the limit of 16777216 pixels" in r.json()["error"]
    assert dt < 0.5
    r, _ = _post(client, gif(64, 64, 3)[:40])
    assert r.status_code == 415 and "images[0] (x.png)" in r.json()["error"]
    limits = client.get("/healthz").json()["limits"]
    assert limits["max_decode_bytes"] == 4096 * 4096 * images.DECODE_BYTES_PER_PIXEL
    assert limits["frames_decoded"] == 1 and limits["max_concurrent_decodes"] >= 1


def test_the_python_api_reads_the_first_frame_through_the_same_decoder(tiny_run, tmp_path):
    cap = fastcap.load(tiny_run, device="cpu")
    data = gif(40, 30, 4)
    (tmp_path / "a.gif").write_bytes(data)
    p = cap.prepare(tmp_path / "a.gif")
    assert torch.equal(p.pixels, images.decode_bytes(data, cap.image_size))
    with pytest.raises(ValueError, match="no known image format"):
        cap.caption(b"not an image")
    assert json.dumps(cap.caption(data).text)
