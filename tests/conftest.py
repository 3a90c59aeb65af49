"""Test-wide set-up. Without a GPU, Triton kernels run in the interpreter and DeepSpeed on the
CPU; both flags must be set before triton/deepspeed are imported, hence here, at the top."""

import json
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


def train_tiny_run(out: Path, shapes: Path) -> Path:
    """A run folder as fastcap-train writes it (config.json, tokenizer.json, model.pt) for a
    tiny captioner trained for a few steps (plain AdamW, no DeepSpeed) on the tiny shapes data;
    shared by the CLI, API, bundle and server tests through the ``tiny_run`` fixture."""
    from fastcap.data.captionset import CaptionSet
    from fastcap.data.karpathy import load_records
    from fastcap.data.tokenizer import CaptionTokenizer
    from fastcap.model import Captioner, ModelConfig
    from fastcap.train.config import DataConfig, TrainConfig, to_dict

    out.mkdir(parents=True, exist_ok=True)
    recs = load_records(shapes / "dataset.json", shapes, "train")
    tok = CaptionTokenizer.train([c for r in recs for c in r.captions], vocab_size=64)
    mc = ModelConfig(
        image_size=32,
        width=64,
        heads=4,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=1,
        embed_dim=32,
        max_len=24,
        vocab_size=tok.vocab_size,
    )
    cfg = TrainConfig(model=mc, data=DataConfig(data=f"shapes:{shapes}"), out=str(out))
    torch.manual_seed(0)
    model = Captioner(mc)
    cs = CaptionSet(recs, tok, mc.image_size, mc.max_len, progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(5):  # 15 steps: enough for captions that differ between images
        for batch in cs.batches(epoch, 0, 32, seed=0):
            loss = model(batch.images, batch.tokens, batch.lens)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    tok.save(out / "tokenizer.json")
    blob = {"model": model.state_dict(), "model_config": to_dict(cfg)["model"]}
    torch.save(blob, out / "model.pt.tmp")
    (out / "model.pt.tmp").rename(out / "model.pt")  # complete or absent, for the cache below
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_shapes) -> Path:
    """The tiny run folder, trained once per session whichever test file asks first."""
    out = tmp_path_factory.getbasetemp() / "fastcap-tiny-run"
    if not (out / "model.pt").is_file():
        train_tiny_run(out, tiny_shapes)
    return out
