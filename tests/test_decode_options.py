"""Decoding options are validated where they are parsed, one place for the CLI, the Python API
and the server: a value that would overflow (temperature 1e-40, length_penalty 1e4, a seed past
2^64, NaN) is one error naming the option (a 422 from the server), and a request that fails in
a batch never fails the other requests of that batch."""

from __future__ import annotations

import asyncio
import base64
import json
import math

import pytest
from fastapi.testclient import TestClient

import fastcap
from fastcap.api import DecodeOptions
from fastcap.cli.caption import decoding_kwargs, parser
from fastcap.serve.app import create_app
from fastcap.serve.batcher import Batcher
from tests.test_hostile_images import png

BAD = {
    # option: values that passed validation on main and then failed the whole batch (or
    # produced NaN scores, which JSON cannot carry)
    "temperature": [1e-40, math.inf, math.nan],
    "length_penalty": [1e4, -1e4, math.inf, math.nan],
    "seed": [2**64, -1],
    "repetition_penalty": [1e-40, 1e40, math.nan],
}
CASES = [(k, v) for k, vs in BAD.items() for v in vs]


def _strategy(name: str) -> str:
    return "beam" if name == "length_penalty" else "sample"


@pytest.mark.parametrize("name,value", CASES)
def test_python_api_options_name_the_bad_one(name, value):
    """main: DecodeOptions accepted every one of these."""
    with pytest.raises(ValueError, match=name):
        DecodeOptions(strategy=_strategy(name), **{name: value})


@pytest.mark.parametrize("name,value", [c for c in CASES if not isinstance(c[1], float) or
                                        math.isfinite(c[1])])  # fmt: skip
def test_cli_options_name_the_bad_one(name, value):
    args = parser().parse_args(
        ["run", "x.png", "--strategy", _strategy(name), f"--{name.replace('_', '-')}", str(value)]
    )
    with pytest.raises(ValueError, match=name):
        decoding_kwargs(args)


def test_good_edges_still_pass():
    DecodeOptions(strategy="sample", temperature=0.01, seed=2**64 - 1, repetition_penalty=100.0)
    DecodeOptions(strategy="beam", length_penalty=-10.0)
    DecodeOptions(strategy="beam", length_penalty=10.0)


@pytest.fixture(scope="module")
def client(tiny_run):
    cap = fastcap.load(tiny_run, device="cpu")
    with TestClient(create_app(cap), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("name,value", CASES)
def test_server_answers_422_naming_the_option(client, name, value):
    """main: temperature=1e-40 and seed=2**64 were a 500 (multinomial on NaN probabilities,
    manual_seed overflow); length_penalty=1e4 a 500 (OverflowError in the length penalty)."""
    image = base64.b64encode(png(8, 8)).decode()
    body = json.dumps({"images": [image], "strategy": _strategy(name), name: value})  # NaN too
    r = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and name in r.json()["error"], r.text
    assert client.get("/healthz").status_code == 200


def test_a_failing_request_never_fails_the_others_in_its_batch():
    """main: the batcher handed one exception to every request of the batch."""

    def run(key, items):
        if "poison" in items:
            raise RuntimeError("poison")
        return [f"ok {x}" for x in items]

    async def main():
        b = Batcher(run, max_batch=8, window_s=0.2)
        b.start()
        try:
            jobs = [b.submit("k", ["a"]), b.submit("k", ["poison"]), b.submit("k", ["b", "c"])]
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            b.stop()

    a, bad, bc = asyncio.run(main())
    assert isinstance(bad, RuntimeError)
    assert a[0] == ["ok a"] and bc[0] == ["ok b", "ok c"], (a, bc)
