"""Test-wide set-up. Without a GPU, Triton kernels run in the interpreter and DeepSpeed on the
CPU; both flags must be set before triton/deepspeed are imported, hence here, at the top."""

import os
import random
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("FASTCAP_KERNELS", "auto")


import pytest  # noqa: E402

# A run small enough for a test: 32 px shapes, a 1+1+1-layer model of width 64.
TINY_OVERRIDES = [
    "model.image_size=32",
    "model.width=64",
    "model.heads=4",
    "model.encoder_layers=1",
    "model.unimodal_layers=1",
    "model.multimodal_layers=1",
    "model.embed_dim=32",
    "model.max_len=24",
    "data.vocab_size=64",
    "batch_size=16",
    "eval_samples=8",
    "data.eval_splits=test",
    "log_every=5",
    "diag_every=10",
    "optim.warmup_steps=5",
    "num_samples=2",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A tiny shapes dataset (32 px): 96 train, 16 val, 16 test, 16 compositional images."""
    from fastcap.data.shapes import generate

    out = tmp_path_factory.mktemp("data") / "shapes"
    generate(out, train=96, val=16, test=16, compositional=16, size=32, seed=0, progress=False)
    return out


# Data shared between checkouts: beside the repository (never copied into it) unless
# FASTCAP_SHARED_DATA names another folder.
SHARED_DATA = Path(
    os.environ.get("FASTCAP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def shared_data(name: str) -> Path:
    """``SHARED_DATA / name``. When it is missing the test skips, except under CI (``CI`` set to
    ``true`` or ``1``), where it fails: a CI machine without the data is misconfigured, and a
    skip there would hide the tests that read real files."""
    path = SHARED_DATA / name
    if not path.is_dir():
        msg = f"the shared data folder {path} is missing"
        if os.environ.get("CI", "").strip().lower() in ("true", "1"):
            pytest.fail(f"{msg} (CI is set, so this is an error, not a skip)", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def flickr8k_1k() -> Path:
    """The 1,000 Flickr8k photographs with captions.txt (a ``folder:`` dataset)."""
    return shared_data("flickr8k-1k")


# Tests that draw random names or shapes draw them from this seed and print it, so that a
# failure can be replayed with FASTCAP_TEST_SEED=N.
TEST_SEED = int(os.environ.get("FASTCAP_TEST_SEED") or random.SystemRandom().randrange(2**32))


@pytest.fixture(scope="session")
def test_seed() -> int:
    return TEST_SEED
