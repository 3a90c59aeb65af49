"""fastcap-serve: the JSON API (FastAPI's TestClient, and a real uvicorn on a free port), every
limit with its 4xx, the batcher, concurrency (16 requests at once are batched; a client that
uploads byte by byte does not hold up another), the console script, and the page driven in a
real headless Chromium through selenium.

Under CI (``CI`` set to true or 1) a missing browser fails the browser test; elsewhere it
skips (``make install`` installs Debian's chromium and chromium-driver)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

import fastcap
from fastcap.serve.app import Limits, create_app
from fastcap.serve.batcher import Batcher, Overloaded

SMALL = Limits(max_upload_bytes=200_000, max_pixels=64 * 64, max_images=3, max_beams=4)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.fixture(scope="module")
def cap(tiny_run):
    return fastcap.load(tiny_run, device="cpu")


@pytest.fixture(scope="session")
def pngs(tiny_shapes) -> list[bytes]:
    """The 16 test images of the tiny shapes data, as PNG bytes (32 x 32)."""
    paths = sorted((tiny_shapes / "test").glob("*.png"), key=lambda p: int(p.stem))
    return [p.read_bytes() for p in paths]


@pytest.fixture(scope="module")
def client(cap):
    with TestClient(create_app(cap, limits=SMALL)) as c:
        yield c


def _files(*blobs: bytes, names=None) -> list:
    names = names or [f"{i}.png" for i in range(len(blobs))]
    return [("images", (n, b, "image/png")) for n, b in zip(names, blobs)]


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _same(got: list[dict], want) -> None:
    """API answers == the captioner's own (text, tokens; log-probs to 2e-5, which tells the
    test images apart: theirs differ by more than 1e-4)."""
    assert [c["caption"] for c in got] == [w.text for w in want]
    assert [c["tokens"] for c in got] == [w.tokens for w in want]
    np.testing.assert_allclose(
        [c["logprob"] for c in got], [w.logprob for w in want], rtol=0, atol=2e-5
    )


# ---------------------------------------------------------------------- the JSON API
def test_single_image_multipart(client, cap, pngs):
    r = client.post("/v1/captions", files=_files(pngs[0]))
    assert r.status_code == 200, r.text
    d = r.json()
    _same(d["captions"], [cap.caption(pngs[0])])
    assert d["captions"][0]["attention_map"] is None
    assert d["options"]["strategy"] == "greedy" and d["batch"] == {"requests": 1, "images": 1}
    assert d["seconds"] > 0


def test_many_images_in_order(client, cap, pngs):
    r = client.post("/v1/captions", files=_files(*pngs[:3]))
    assert r.status_code == 200, r.text
    _same(r.json()["captions"], cap.caption(pngs[:3]))
    r = client.post("/v1/captions", files=_files(*pngs[2::-1]))
    _same(r.json()["captions"], cap.caption(pngs[2::-1]))


def test_base64_json_and_data_urls(client, cap, pngs):
    want = cap.caption(pngs[:2], strategy="beam", num_beams=2)
    for images in (
        [_b64(pngs[0]), _b64(pngs[1])],
        [f"data:image/png;base64,{_b64(pngs[0])}", _b64(pngs[1])],
    ):
        r = client.post("/v1/captions", json={"images": images, "strategy": "beam", "num_beams": 2})
        assert r.status_code == 200, r.text
        _same(r.json()["captions"], want)
        assert r.json()["options"]["num_beams"] == 2


def test_options_reach_the_decoder(client, cap, pngs):
    form = {"strategy": "beam", "num_beams": "4", "length_penalty": "1.0", "max_new_tokens": "5"}
    r = client.post("/v1/captions", files=_files(pngs[3]), data=form)
    assert r.status_code == 200, r.text
    want = cap.caption(pngs[3], strategy="beam", num_beams=4, length_penalty=1.0, max_new_tokens=5)
    _same(r.json()["captions"], [want])
    assert len(want.tokens) <= 5
    sample = {"images": [_b64(pngs[4])], "strategy": "sample", "seed": 7, "temperature": 2.0}
    a = client.post("/v1/captions", json=sample).json()["captions"]
    b = client.post("/v1/captions", json=sample).json()["captions"]
    assert a == b  # seeded: the same draws
    _same(a, [cap.caption(pngs[4], strategy="sample", seed=7, temperature=2.0)])


def test_attention_map_is_the_api_picture(client, cap, pngs):
    r = client.post("/v1/captions", files=_files(pngs[5]), data={"attention_maps": "true"})
    assert r.status_code == 200, r.text
    url = r.json()["captions"][0]["attention_map"]
    assert url.startswith("data:image/png;base64,")
    got = Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))
    want = cap.caption(pngs[5], return_attention=True).attention
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))


def _chunks(data: bytes, n: int = 4096):
    for i in range(0, len(data), n):
        yield data[i : i + n]


LIMIT_CASES = {
    # name: (request kwargs, status, words the error must contain)
    "body over the limit (Content-Length)": (
        dict(files=_files(b"\x89PNG" + b"0" * 250_000)),
        413,
        "at most 200000 bytes",
    ),
    "body over the limit (chunked, no length)": (
        dict(
            content=_chunks(json.dumps({"images": ["A" * 300_000]}).encode()),
            headers={"content-type": "application/json"},
        ),
        413,
        "at most 200000 bytes",
    ),
    "too many pixels": (dict(files=_files(_png(65, 64))), 413, "65x64 is 4160 pixels"),
    "too many images (multipart)": (
        dict(files=_files(*[_png(8, 8)] * 4)),
        413,
        "at most 3",
    ),
    "far too many images (multipart)": (dict(files=_files(*[_png(8, 8)] * 9)), 413, "at most 3"),
    "too many images (JSON)": (dict(json={"images": [_b64(_png(8, 8))] * 4}), 413, "at most 3"),
    "unknown option (form)": (
        dict(files=_files(_png(8, 8)), data={"beams": "3"}),
        422,
        "unknown option 'beams'",
    ),
    "unknown option (JSON)": (
        dict(json={"images": [_b64(_png(8, 8))], "nucleus": 0.9}),
        422,
        "unknown option 'nucleus'",
    ),
    "unknown strategy": (
        dict(json={"images": [_b64(_png(8, 8))], "strategy": "nucleus"}),
        422,
        "strategy",
    ),
    "bad option type": (
        dict(files=_files(_png(8, 8)), data={"num_beams": "three"}),
        422,
        "num_beams",
    ),
    "bad option value": (
        dict(json={"images": [_b64(_png(8, 8))], "strategy": "sample", "top_p": 2}),
        422,
        "top_p must be in (0, 1]",
    ),
    "num_beams over the limit": (
        dict(json={"images": [_b64(_png(8, 8))], "strategy": "beam", "num_beams": 5}),
        422,
        "num_beams is 5; this server allows <= 4",
    ),
    "max_new_tokens over the model": (
        dict(json={"images": [_b64(_png(8, 8))], "max_new_tokens": 99}),
        422,
        "max_new_tokens is 99; this server allows <= 23",
    ),
    "not an image": (
        dict(files=[("images", ("notes.txt", b"hello, I am text", "text/plain"))]),
        415,
        "images[0] (notes.txt): not an image",
    ),
    "truncated image": (dict(files=_files(_png(32, 32)[:60])), 415, "images[0] (0.png)"),
    "empty file": (dict(files=_files(b"")), 415, "empty file"),
    "bad base64": (dict(json={"images": ["not base64!"]}), 400, "images[0]: not valid base64"),
    "not JSON": (
        dict(content=b"{images", headers={"content-type": "application/json"}),
        400,
        "not valid JSON",
    ),
    "JSON not an object": (dict(json=[1, 2]), 400, "must be a JSON object"),
    "images not a list": (dict(json={"images": "abc"}), 422, "must be a list"),
    "no images": (dict(json={"images": []}), 422, "no images"),
    "no images key": (dict(json={"strategy": "beam"}), 422, "no images"),
    "images as text field": (
        dict(files=_files(_png(8, 8)), data={"images": "abc"}),
        422,
        "'images' must be files",
    ),
    "other file field": (
        dict(files=[("photo", ("a.png", _png(8, 8), "image/png"))]),
        422,
        "unknown file field 'photo'",
    ),
    "option twice": (
        dict(files=_files(_png(8, 8)), data={"strategy": ["beam", "greedy"]}),
        422,
        "given twice",
    ),
    "unsupported content type": (
        dict(content=b"abc", headers={"content-type": "text/plain"}),
        415,
        "content type 'text/plain'",
    ),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_limits_and_bad_input_are_clear_4xx(client, case):
    kw, status, needle = LIMIT_CASES[case]
    r = client.post("/v1/captions", **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and needle in body["error"], body
    assert client.get("/healthz").status_code == 200  # and the server goes on


def test_good_request_after_every_bad_one(client, pngs, cap):
    for kw, _, _ in LIMIT_CASES.values():
        client.post("/v1/captions", **kw)
    r = client.post("/v1/captions", files=_files(pngs[0]))
    assert r.status_code == 200
    _same(r.json()["captions"], [cap.caption(pngs[0])])


@pytest.mark.parametrize(
    "side,needle",
    [
        (6000, "6000x6000 is 36000000 pixels, over the limit of 16777216 pixels"),
        (20000, "over the limit of 16777216 pixels (Image size (400000000 pixels)"),
    ],
)
def test_pixel_limit_is_checked_before_decoding(cap, monkeypatch, side, needle):
    """A 6000 x 6000 PNG (36 MP in 50 KB) is refused from its header by the server's limit; a
    20000 x 20000 one (400 MP) also trips PIL's bomb check first. Decoding either would take
    108 MB or 1.2 GB."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    monkeypatch.setattr(cap, "prepare", lambda *a, **k: pytest.fail("decoded a refused image"))
    with TestClient(create_app(cap, limits=Limits(max_upload_bytes=2**22))) as c:
        r = c.post("/v1/captions", files=_files(buf.getvalue()))
    assert r.status_code == 413 and needle in r.json()["error"], r.text


def test_a_bug_is_a_500_with_json_and_the_server_goes_on(cap, pngs, monkeypatch):
    calls = []

    def broken(items, options, attention=False, batch_size=None):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(items, options, attention, batch_size)

    real = cap.caption_prepared
    monkeypatch.setattr(cap, "caption_prepared", broken)
    with TestClient(create_app(cap), raise_server_exceptions=False) as c:
        r = c.post("/v1/captions", files=_files(pngs[0]))
        assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]
        r = c.post("/v1/captions", files=_files(pngs[0]))
        assert r.status_code == 200 and calls == [1, 1]


def test_a_full_queue_is_a_503(cap, pngs):
    """max_queue=1 and a decoder held on a gate: the first request runs, the second waits in
    the queue, the third is refused at once."""
    gate, entered = threading.Event(), threading.Event()
    real = cap.caption_prepared

    def held(*a, **k):
        entered.set()
        gate.wait(30)
        return real(*a, **k)

    with LiveServer(create_app(cap, max_queue=1, window_ms=0)) as s:
        s.app.state.captioner.caption_prepared = held
        try:
            results = {}

            def post(name):
                results[name] = httpx.post(
                    s.url + "/v1/captions", files=_files(pngs[0]), timeout=60
                )

            first = threading.Thread(target=post, args=("first",))
            first.start()
            assert entered.wait(30)
            second = threading.Thread(target=post, args=("second",))
            second.start()
            t0 = time.monotonic()
            while httpx.get(s.url + "/healthz").json()["batching"]["waiting_images"] < 1:
                assert time.monotonic() - t0 < 30
                time.sleep(0.02)
            post("third")
            assert results["third"].status_code == 503
            assert "the queue holds 1 images" in results["third"].json()["error"]
            gate.set()
            first.join(60)
            second.join(60)
            assert results["first"].status_code == results["second"].status_code == 200
        finally:
            gate.set()
            del s.app.state.captioner.caption_prepared


def test_healthz_openapi_docs_page(client, cap):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model"]["image_size"] == cap.image_size
    assert h["limits"]["max_images"] == 3 and h["limits"]["max_new_tokens"] == 23
    assert {"batches", "requests", "images", "max_batch_requests", "requests_per_batch"} <= set(
        h["batching"]
    )
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/captions"]["post"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    props = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"images", "strategy", "num_beams", "top_p", "attention_maps"} <= set(props)
    assert {"200", "413", "415", "422"} <= set(post["responses"])
    assert "/healthz" in spec["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text and 'id="strategy"' in page.text
    r = client.get("/no/such/page")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


# ---------------------------------------------------------------------- the batcher alone
def test_batcher_groups_by_key_and_keeps_order():
    seen = []

    def run(key, items):
        seen.append((key, list(items)))
        time.sleep(0.05)
        return [(key, x) for x in items]

    async def main():
        b = Batcher(run, max_batch=5, window_s=0.2)
        b.start()
        try:
            jobs = [("a", [1, 2]), ("b", [3]), ("a", [4]), ("a", [5, 6]), ("a", [7])]
            results = await asyncio.gather(*(b.submit(k, v) for k, v in jobs))
            return results, b.stats()
        finally:
            b.stop()

    results, stats = asyncio.run(main())
    for (k, v), (res, _) in zip(
        [("a", [1, 2]), ("b", [3]), ("a", [4]), ("a", [5, 6]), ("a", [7])], results
    ):
        assert res == [(k, x) for x in v]
    # the window gathers all five; "a" first (the oldest), up to 5 images; then the rest
    assert seen == [("a", [1, 2, 4, 5, 6]), ("b", [3]), ("a", [7])]
    assert [r[1].requests for r in results] == [3, 1, 3, 3, 1]
    assert stats["batches"] == 3 and stats["max_batch_images"] == 5
    assert stats["requests_per_batch"] == {"1": 2, "3": 1}


def test_batcher_overload_errors_and_abandoned_jobs():
    gate = threading.Event()
    ran = []

    def run(key, items):
        ran.append(list(items))
        gate.wait(5)
        if "bad" in items:
            raise ValueError("bad item")
        return items

    async def main():
        b = Batcher(run, max_batch=1, window_s=0.0, max_queue=2)
        b.start()
        try:
            first = asyncio.ensure_future(b.submit("k", ["x"]))
            await asyncio.sleep(0.1)  # the worker holds "x"
            second = asyncio.ensure_future(b.submit("k", ["bad"]))
            gone = asyncio.ensure_future(b.submit("k", ["gone"]))
            await asyncio.sleep(0.05)
            with pytest.raises(Overloaded, match="the queue holds 2 images"):
                await b.submit("k", ["y"])
            gone.cancel()  # its client went away: never run
            gate.set()
            assert (await first)[0] == ["x"]
            with pytest.raises(ValueError, match="bad item"):
                await second
            return b.stats()
        finally:
            b.stop()

    stats = asyncio.run(main())
    assert ran == [["x"], ["bad"]] and stats["waiting_images"] == 0


# ---------------------------------------------------------------------- a real server
class LiveServer:
    """uvicorn serving ``app`` on a free port of 127.0.0.1, in a thread of this process."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() - t0 < 30, "uvicorn did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(cap):
    with LiveServer(create_app(cap, window_ms=10)) as s:
        yield s


def test_real_server_single_and_healthz(live, cap, pngs):
    r = httpx.post(live.url + "/v1/captions", files=_files(pngs[0]), timeout=30)
    assert r.status_code == 200
    _same(r.json()["captions"], [cap.caption(pngs[0])])
    assert httpx.get(live.url + "/healthz").json()["status"] == "ok"


def test_16_concurrent_requests_are_answered_and_batched(live, cap, pngs):
    """16 threads post one image each at the same moment: every one gets its own image's
    caption, and the server ran them in fewer batches than requests."""
    before = httpx.get(live.url + "/healthz").json()["batching"]
    want = [cap.caption(p) for p in pngs]
    start = threading.Barrier(16)
    answers: list = [None] * 16

    def post(i):
        with httpx.Client(timeout=60) as c:
            start.wait()
            answers[i] = c.post(live.url + "/v1/captions", files=_files(pngs[i]))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(a is not None and a.status_code == 200 for a in answers)
    for i, a in enumerate(answers):
        _same(a.json()["captions"], [want[i]])
    after = httpx.get(live.url + "/healthz").json()["batching"]
    batches = after["batches"] - before["batches"]
    assert after["requests"] - before["requests"] == 16
    sizes = sorted((a.json()["batch"]["requests"] for a in answers), reverse=True)
    print(f"16 concurrent requests ran in {batches} batches; batch of each request: {sizes}")
    assert batches < 16 and sizes[0] >= 2, (batches, sizes)


def _raw_request(port: int, body: bytes, content_type: str) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return s, head


def _read_response(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(
        next(
            ln.split(b":")[1]
            for ln in head.split(b"\r\n")
            if ln.lower().startswith(b"content-length")
        )
    )
    while len(rest) < length:
        rest += s.recv(65536)
    return status, json.loads(rest[:length])


def test_a_slow_upload_does_not_delay_a_fast_client(live, cap, pngs):
    """One client sends its upload a byte every 20 ms (3 s in all); meanwhile a second client
    is answered as fast as ever, and the slow one is answered once its upload is complete."""
    req = httpx.Request("POST", live.url + "/v1/captions", files=_files(pngs[1]))
    body = req.read()
    s, head = _raw_request(live.port, body, req.headers["content-type"])
    s.sendall(head)
    trickle = 150  # bytes sent slowly, 20 ms apart: 3 s
    done = threading.Event()

    def slow():
        for i in range(trickle):
            s.sendall(body[i : i + 1])
            time.sleep(0.02)
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)  # the slow upload is under way
    latencies = []
    for i in range(3):
        t0 = time.perf_counter()
        r = httpx.post(live.url + "/v1/captions", files=_files(pngs[2 + i]), timeout=30)
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200
        _same(r.json()["captions"], [cap.caption(pngs[2 + i])])
    assert not done.is_set(), "the slow upload ended before the fast requests: no overlap"
    print(f"fast requests during a slow upload: {[round(x, 3) for x in latencies]} s")
    assert max(latencies) < 1.5
    t.join(10)
    s.sendall(body[trickle:])
    status, answer = _read_response(s)
    s.close()
    assert status == 200
    _same(answer["captions"], [cap.caption(pngs[1])])


def test_a_huge_content_length_is_refused_before_the_body(live):
    s, head = _raw_request(live.port, b"", "application/json")
    s.sendall(head.replace(b"Content-Length: 0", b"Content-Length: 10000000000"))
    t0 = time.perf_counter()
    status, answer = _read_response(s)  # no body was sent: the answer cannot have waited for it
    s.close()
    assert status == 413 and "10000000000 bytes" in answer["error"]
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------- the console script
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fastcap_serve_console_script_on_a_bundle(tiny_run, tmp_path, cap, pngs):
    exe = Path(sys.executable).parent / "fastcap-serve"
    bad = subprocess.run(
        [str(exe), str(tmp_path / "absent")], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "no such folder" in bad.stderr
    bundle = tmp_path / "bundle"
    subprocess.run(
        [str(Path(sys.executable).parent / "fastcap-export"), str(tiny_run), "--out", str(bundle)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = _free_port()
    proc = subprocess.Popen(
        [str(exe), str(bundle), "--port", str(port), "--device", "cpu", "--max-images", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                h = httpx.get(url + "/healthz", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() - t0 < 120, "fastcap-serve did not come up"
                time.sleep(0.2)
        assert h["model"]["source"] == str(bundle) and h["limits"]["max_images"] == 2
        r = httpx.post(url + "/v1/captions", files=_files(pngs[0]), timeout=30)
        _same(r.json()["captions"], [cap.caption(pngs[0])])
        r = httpx.post(url + "/v1/captions", files=_files(*pngs[:3]), timeout=30)
        assert r.status_code == 413
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


# ---------------------------------------------------------------------- a real browser
def need_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths and selenium importable; else skip, or under CI fail:
    a CI machine without them is misconfigured, and a skip there would hide the only test of
    the page."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the dev extra)")
    if missing:
        msg = f"{', '.join(missing)} not installed (make install installs them)"
        if _ci():
            pytest.fail(f"{msg}; CI is set, so this is an error, not a skip", pytrace=False)
        pytest.skip(msg)
    return chromium, driver


def test_missing_browser_skips_here_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for ci, outcome in (
        ("", pytest.skip),
        ("false", pytest.skip),
        ("true", pytest.fail),
        ("1", pytest.fail),
    ):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(outcome.Exception, match="chromium, chromedriver not installed"):
            need_browser()


@pytest.mark.slow
def test_the_page_in_a_real_browser(live, cap, pngs, tmp_path):
    """Headless Chromium: load the page, put an image in the file input, choose beam search,
    click, and wait for the caption and the attention-map picture."""
    chromium, driver = need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image = tmp_path / "shape.png"
    image.write_bytes(pngs[6])
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        opts.add_argument(flag)
    browser = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    try:
        browser.get(live.url + "/")
        assert browser.title == "fastcap"
        browser.find_element(By.ID, "file").send_keys(str(image))
        Select(browser.find_element(By.ID, "strategy")).select_by_value("beam")
        beams = browser.find_element(By.ID, "num_beams")
        assert beams.is_displayed()  # the beam options show for beam search
        beams.clear()
        beams.send_keys("3")
        browser.find_element(By.ID, "go").click()
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "caption").text.strip())
        wait.until(
            lambda b: b.execute_script(
                "const i = document.getElementById('attention'); "
                "return i.complete && i.naturalWidth > 0 && i.style.display !== 'none';"
            )
        )
        assert browser.find_element(By.ID, "error").text == ""
        caption = browser.find_element(By.ID, "caption").text
        want = cap.caption(pngs[6], strategy="beam", num_beams=3, return_attention=True)
        assert caption == want.text
        assert "beam" in browser.find_element(By.ID, "meta").text
        size = browser.execute_script(
            "const i = document.getElementById('attention');"
            "return [i.naturalWidth, i.naturalHeight];"
        )
        assert tuple(size) == want.attention.size
    finally:
        browser.quit()
