"""A seeded sampling request returns the same captions alone, in a batch with other requests,
and under concurrent load: each image draws from its own counter-based stream (its request's
seed and its index there), not from one generator shared by the batch."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

import fastcap
from fastcap.generate import derive_seeds, row_uniforms, sample
from fastcap.serve.app import create_app
from tests.test_serve import LiveServer, _files

OPTS = {"strategy": "sample", "temperature": "3.0", "top_p": "1.0"}  # draws that differ


@pytest.fixture(scope="module")
def cap(tiny_run):
    return fastcap.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def pngs(tiny_shapes) -> list[bytes]:
    paths = sorted((tiny_shapes / "test").glob("*.png"), key=lambda p: int(p.stem))
    return [p.read_bytes() for p in paths]


def test_row_streams_are_splitmix64():
    """The device streams equal splitmix64 computed with Python's integers."""

    def ref(seed: int, t: int) -> float:
        m = 2**64
        z = (seed + (t + 1) * 0x9E3779B97F4A7C15) % m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
        return ((z ^ (z >> 31)) >> 11) * 2.0**-53

    seeds = [0, 1, 2**62 + 12345, 2**63 - 1, *derive_seeds(2**64 - 1, 3)]
    for t in (0, 1, 7, 1000):
        assert row_uniforms(torch.tensor(seeds), t).tolist() == [ref(s, t) for s in seeds]


def test_an_images_draws_do_not_depend_on_its_batch(cap, pngs):
    """sample(row_seeds=...): image 0 alone and beside 7 others, with 2 samples each."""
    x = torch.stack([cap.prepare(p).pixels for p in pngs[:8]])
    seeds = torch.tensor(derive_seeds(5, 8))
    kw = dict(temperature=3.0, top_p=1.0, num_return_sequences=2)
    alone = sample(cap.model, x[:1], row_seeds=seeds[:1], **kw)
    batch = sample(cap.model, x, row_seeds=seeds, **kw)
    for j in range(2):
        n = int(alone.lens[j])
        assert alone.tokens[j, :n].tolist() == batch.tokens[j, :n].tolist()
    assert len({tuple(r.tolist()) for r in batch.tokens}) > 8  # and the draws do differ


def _post(url: str, images: list[bytes], seed: int) -> dict:
    with httpx.Client(timeout=120) as c:
        r = c.post(url + "/v1/captions", files=_files(*images), data={**OPTS, "seed": str(seed)})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_seeded_request_is_the_same_alone_in_a_batch_and_under_load(cap, pngs):
    """main: identical seeded requests sent together shared one batch and one generator, so
    each got other draws than alone (and requests of other seeds waited for other batches)."""
    with LiveServer(create_app(cap, window_ms=300, max_batch=64)) as live:
        mine = pngs[:3]
        alone = _post(live.url, mine, seed=11)["captions"]
        assert alone == _post(live.url, mine, seed=11)["captions"]
        # 12 requests at once: 6 the same as mine, 6 others (other images and seeds)
        start = threading.Barrier(12)
        answers: list = [None] * 12

        def post(i):
            start.wait()
            if i % 2:
                answers[i] = _post(live.url, pngs[3 + i : 5 + i], seed=100 + i)
            else:
                answers[i] = _post(live.url, mine, seed=11)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert all(a is not None for a in answers)
        batched = max(a["batch"]["requests"] for a in answers)
        print(f"12 concurrent seeded requests: largest batch {batched} requests")
        assert batched >= 2
        for i in range(0, 12, 2):  # the same tokens; log-probs as the batch's matmuls round
            got = answers[i]["captions"]
            assert [c["tokens"] for c in got] == [c["tokens"] for c in alone], i
            assert all(abs(a["logprob"] - b["logprob"]) < 1e-3 for a, b in zip(got, alone))
    # and the Python API gives the server's captions: the same seed per (request seed, index)
    want = cap.caption(mine, strategy="sample", temperature=3.0, top_p=1.0, seed=11)
    assert [c.tokens for c in want] == [c["tokens"] for c in alone]
    assert [c.tokens for c in want] == [
        c.tokens
        for c in cap.caption(
            mine, strategy="sample", temperature=3.0, top_p=1.0, seed=11, batch_size=1
        )
    ]
