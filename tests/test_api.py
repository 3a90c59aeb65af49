"""fastcap.load and ImageCaptioner.caption: every input kind gives the CLI's caption, batching
changes nothing, return_attention gives the CLI's picture, bad input is one clear ValueError,
and the README's example runs as written.

The tiny trained run (``tiny_run``) is shared with tests/test_bundle.py and tests/test_serve.py:
it is trained once per session into the session's base temp folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastcap
from fastcap.api import Caption, ImageCaptioner
from fastcap.cli import caption as caption_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shape_pngs(tiny_shapes) -> list[Path]:
    """Eight test images of the tiny shapes data (PNG: every decoder gives the same pixels)."""
    return sorted((tiny_shapes / "test").glob("*.png"), key=lambda p: int(p.stem))[:8]


@pytest.fixture(scope="module")
def cap(tiny_run) -> ImageCaptioner:
    return fastcap.load(tiny_run, device="cpu")


def _cli_captions(run, paths, capsys, *extra) -> list[tuple[str, float]]:
    """fastcap-caption --json -> [(caption, score)]: greedy's score is the summed log-prob."""
    rc = caption_cli.main([str(run), *map(str, paths), "--json", *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return [(r["captions"][0]["caption"], r["captions"][0]["score"]) for r in json.loads(out.out)]


def _same(got: list[Caption] | Caption, want: list[tuple[str, float]]) -> None:
    """The same captions and log-probs (to 2e-5: between two of the test images they differ by
    more than 1e-4, so a wrong pixel or a swapped image shows)."""
    got = got if isinstance(got, list) else [got]
    assert [c.text for c in got] == [t for t, _ in want]
    np.testing.assert_allclose([c.logprob for c in got], [s for _, s in want], rtol=0, atol=2e-5)


def test_load_defaults_and_repr(cap, tiny_run):
    assert cap.device.type == "cpu" and cap.dtype == torch.float32
    assert cap.batch_size == 16 and cap.image_size == 32
    assert not cap.model.training
    assert str(tiny_run) in repr(cap)
    info = cap.info()
    assert info["parameters"] > 0 and info["max_new_tokens"] == 23


def test_every_input_kind_gives_the_cli_caption(cap, tiny_run, shape_pngs, capsys):
    path = shape_pngs[0]
    want = _cli_captions(tiny_run, [path], capsys)[0]
    pil = Image.open(path)
    arr = np.array(pil.convert("RGB"))  # (H, W, 3) uint8
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    kinds = {
        "str": str(path),
        "Path": path,
        "bytes": path.read_bytes(),
        "PIL": pil,
        "numpy uint8": arr,
        "numpy float": arr.astype(np.float32) / 255,
        "tensor uint8": chw,
        "tensor float": chw.double() / 255,
        "numpy RGBA": np.concatenate([arr, np.full_like(arr[..., :1], 7)], axis=2),
    }
    for name, image in kinds.items():
        c = cap.caption(image)
        assert isinstance(c, Caption), name
        _same(c, [want])
    c = cap.caption(path)
    assert c.tokens[-1] == cap.tokenizer.eos_id or len(c.tokens) == 23
    assert cap.tokenizer.decode(c.tokens) == c.text
    assert c.logprob == c.score and c.logprob < 0 and c.attention is None
    # gray: one channel, as (H, W) numpy and (1, H, W) tensor
    gray = np.array(pil.convert("L"))
    g = cap.caption(pil.convert("L"))
    for image in (gray, torch.from_numpy(gray)[None], gray[:, :, None]):
        _same(cap.caption(image), [(g.text, g.logprob)])
    assert abs(g.logprob - want[1]) > 1e-4  # gray is another image


def test_many_images_in_order_batched_like_one_by_one(cap, tiny_run, shape_pngs, capsys):
    for kw in ({}, {"strategy": "beam", "num_beams": 3}):
        singles = [cap.caption(p, **kw) for p in shape_pngs]
        for bs in (1, 3, 64):  # beam: 3 rows an image, so 1 image a batch at bs=3 too
            many = cap.caption(shape_pngs, batch_size=bs, **kw)
            assert isinstance(many, list) and len(many) == len(shape_pngs)
            assert [c.text for c in many] == [c.text for c in singles], (kw, bs)
            assert [c.tokens for c in many] == [c.tokens for c in singles], (kw, bs)
            np.testing.assert_allclose(
                [c.logprob for c in many], [c.logprob for c in singles], rtol=0, atol=2e-5
            )
        # the tiny run writes one caption for every image, but its log-probabilities differ
        # by more than 2e-5 between images: the check above would see images swapped
        gaps = np.diff(sorted(c.logprob for c in singles))
        assert gaps.min() > 1e-4, gaps
    cli = _cli_captions(tiny_run, shape_pngs, capsys)
    _same(cap.caption(shape_pngs), cli)
    # a 4-d batch is many images; a tuple too
    stack = torch.stack(
        [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in shape_pngs]
    )
    _same(cap.caption(stack), cli)
    _same(cap.caption(tuple(shape_pngs[:2])), cli[:2])
    _same(cap.caption(stack.permute(0, 2, 3, 1).numpy()), cli)


def test_beam_logprob_is_the_plain_sum(cap, shape_pngs):
    """beam's score is length-penalised; logprob undoes it; with num_beams=1 beam is greedy."""
    g = cap.caption(shape_pngs[:3])
    b1 = cap.caption(shape_pngs[:3], strategy="beam", num_beams=1, length_penalty=0.0)
    assert [c.text for c in b1] == [c.text for c in g]
    np.testing.assert_allclose([c.logprob for c in b1], [c.logprob for c in g], rtol=1e-4)
    b = cap.caption(shape_pngs[0], strategy="beam", num_beams=3, length_penalty=1.0)
    lp = (5 + len(b.tokens)) / 6
    assert b.logprob == pytest.approx(b.score * lp, rel=1e-5) and b.score != b.logprob


def test_sampling_seeded(cap, shape_pngs):
    a = cap.caption(shape_pngs, strategy="sample", top_p=0.9, temperature=1.5, seed=3)
    b = cap.caption(shape_pngs, strategy="sample", top_p=0.9, temperature=1.5, seed=3)
    assert [c.tokens for c in a] == [c.tokens for c in b]


def test_max_new_tokens(cap, shape_pngs):
    cs = cap.caption(shape_pngs, max_new_tokens=2)
    assert all(len(c.tokens) <= 2 for c in cs)


def test_return_attention_is_the_cli_picture(cap, tiny_run, shape_pngs, tmp_path, capsys):
    maps = tmp_path / "maps"
    rc = caption_cli.main([str(tiny_run), *map(str, shape_pngs[:3]), "--attention-maps", str(maps)])
    assert rc == 0
    capsys.readouterr()
    got = cap.caption(shape_pngs[:3], return_attention=True, batch_size=2)
    for p, c in zip(shape_pngs[:3], got):
        assert isinstance(c.attention, Image.Image)
        want = Image.open(maps / f"{p.stem}.png").convert("RGB")
        assert c.attention.size == want.size and c.attention.width >= 256
        assert np.array_equal(np.asarray(c.attention.convert("RGB")), np.asarray(want))
    # from an array: the same picture as from its file
    arr = np.asarray(Image.open(shape_pngs[0]))
    a = cap.caption(arr, return_attention=True)
    assert np.array_equal(np.asarray(a.attention), np.asarray(got[0].attention))


@pytest.mark.parametrize(
    "image,needle",
    [
        ("/no/such/file.png", r"image 0 \(/no/such/file.png\): cannot read the file"),
        (b"", "image 0: zero-byte file"),
        (b"GIF89a not really", "image 0: not an image"),
        (np.zeros((8, 8, 2), np.uint8), r"C = 1, 3 or 4, got shape \(2, 8, 8\)"),
        (np.zeros((8, 8), np.uint16), "expected uint8 or floats in \\[0, 1\\], got numpy uint16"),
        (np.zeros((8,), np.uint8), "2 or 3 dims"),
        (torch.zeros(3, 0, 8, dtype=torch.uint8), r"got shape \(3, 0, 8\)"),
        (torch.randn(3, 8, 8), r"must lie in \[0, 1\].*already normalised"),
        (torch.full((3, 8, 8), float("nan")), r"must lie in \[0, 1\]"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), "got torch.int32"),
        ({"not": "an image"}, "unsupported image type dict"),
        (None, "unsupported image type NoneType"),
    ],
)
def test_bad_image_is_one_clear_value_error(cap, image, needle):
    with pytest.raises(ValueError, match=needle) as e:
        cap.caption(image)
    assert "\n" not in str(e.value)


def test_bad_image_in_a_list_is_named_by_index(cap, shape_pngs, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    with pytest.raises(ValueError, match=rf"^image 2 \({re.escape(str(txt))}\): not an image"):
        cap.caption([shape_pngs[0], shape_pngs[1], txt])
    with pytest.raises(ValueError, match="no images given"):
        cap.caption([])


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"strategy": "nucleus"}, "unknown strategy 'nucleus'"),
        ({"num_beams": 0, "strategy": "beam"}, "num_beams must be >= 1"),
        ({"num_beams": 2.5, "strategy": "beam"}, "num_beams must be int"),
        ({"top_p": 0.0, "strategy": "sample"}, "top_p must be in"),
        ({"temperature": -1.0, "strategy": "sample"}, "temperature must be in"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"seed": "3"}, "seed must be int"),
        ({"min_new_tokens": True}, "min_new_tokens must be int"),
    ],
)
def test_bad_option_is_a_value_error(cap, shape_pngs, kw, needle):
    with pytest.raises(ValueError, match=needle):
        cap.caption(shape_pngs[0], **kw)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        fastcap.load(tmp_path / "absent")
    with pytest.raises(ValueError, match="has no config.json"):
        fastcap.load(tmp_path)


def _readme_example() -> str:
    """The first ```python block of the README's section on using a trained model."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using a trained model", 1)
    assert len(section) == 2, "README lost its section 'Using a trained model'"
    m = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert m, "the section has no ```python block"
    return m.group(1)


def test_readme_example_runs(tiny_run, shape_pngs, tmp_path):
    code = _readme_example()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 5, f"the README promises a five-line example, it has {len(lines)}"
    # the example names runs/shapes-tiny and photo.png: give it those, in a scratch folder
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "shapes-tiny").symlink_to(tiny_run)
    (tmp_path / "photo.png").write_bytes(shape_pngs[0].read_bytes())
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "the example prints nothing"
    assert (tmp_path / "attention.png").is_file()
