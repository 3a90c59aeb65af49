"""fastcap-caption and fastcap-eval end to end on a tiny run folder: real photographs in every
mode, a corrupt file, attention maps, bad input; and load_run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastcap.cli import caption as caption_cli
from fastcap.cli import eval as eval_cli
from fastcap.data.karpathy import load_records
from fastcap.runs import RunError, load_run


@pytest.fixture(scope="session")
def run_dir(tiny_run) -> Path:
    """The tiny trained run folder (tests/conftest.py), read-only here."""
    return tiny_run


@pytest.fixture(scope="session")
def photos(tmp_path_factory, flickr8k_1k) -> dict[str, Path]:
    """Flickr8k photographs (read from the shared data, never copied into the repository):
    one as is, and converted in tmp to grayscale, RGBA, palette PNG and an odd size; plus a
    corrupt file."""
    src = sorted((flickr8k_1k / "images").glob("*.jpg"))[:5]
    tmp = tmp_path_factory.mktemp("photos")
    out = {"rgb": src[0]}
    Image.open(src[1]).convert("L").save(tmp / "gray.png")
    Image.open(src[2]).convert("RGBA").save(tmp / "rgba.png")
    Image.open(src[3]).convert("P", palette=Image.ADAPTIVE, colors=64).save(tmp / "palette.png")
    Image.open(src[4]).resize((17, 301)).save(tmp / "odd.jpg")
    for name in ("gray", "rgba", "palette"):
        out[name] = tmp / f"{name}.png"
    out["odd"] = tmp / "odd.jpg"
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    out["corrupt"] = tmp / "corrupt.jpg"
    return out


def test_missing_shared_data_skips_here_and_fails_under_ci(monkeypatch, tmp_path):
    import conftest

    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    (tmp_path / "there").mkdir()
    for ci in ("", "false", "0", "true", "TRUE", "1"):
        monkeypatch.setenv("CI", ci)
        assert conftest.shared_data("there") == tmp_path / "there"
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="missing"):
        conftest.shared_data("absent")
    for ci, outcome in (("false", pytest.skip), ("true", pytest.fail), ("1", pytest.fail)):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(outcome.Exception, match=re.escape(f"{tmp_path / 'absent'} is missing")):
            conftest.shared_data("absent")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_modes_and_corrupt_file(run_dir, photos, capsys):
    good = [photos[k] for k in ("rgb", "gray", "rgba", "palette", "odd")]
    rc = caption_cli.main([str(run_dir), *map(str, good), str(photos["corrupt"])])
    cap = capsys.readouterr()
    assert rc == 1
    err = _lines(cap.err)
    assert len(err) == 1 and str(photos["corrupt"]) in err[0]
    out = _lines(cap.out)
    assert [line.split("\t")[0] for line in out] == [str(p) for p in good]
    assert all(len(line.split("\t")) == 2 for line in out)


@pytest.mark.parametrize(
    "extra",
    [
        ["--strategy", "greedy"],
        ["--strategy", "beam", "--num-beams", "3", "--num-return-sequences", "2"],
        ["--strategy", "sample", "--top-p", "0.9", "--top-k", "5", "--seed", "3"],
    ],
)
def test_json_output_every_strategy(run_dir, photos, capsys, extra):
    good = [photos[k] for k in ("rgb", "gray", "palette")]
    rc = caption_cli.main([str(run_dir), *map(str, good), "--json", "--batch-size", "2", *extra])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    recs = json.loads(cap.out)
    assert [r["image"] for r in recs] == [str(p) for p in good]
    R = 2 if "--num-return-sequences" in extra else 1
    for r in recs:
        assert len(r["captions"]) == R
        for c in r["captions"]:
            assert isinstance(c["caption"], str) and c["score"] <= 0.0
        scores = [c["score"] for c in r["captions"]]
        assert scores == sorted(scores, reverse=True)


def test_sample_is_reproducible_from_the_command_line(run_dir, photos, capsys):
    args = [str(run_dir), str(photos["rgb"]), str(photos["odd"]), "--strategy", "sample"]
    outs = []
    for _ in range(2):
        assert caption_cli.main([*args, "--seed", "5", "--temperature", "1.5"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_a_seeded_caption_is_the_same_in_any_batch_and_through_the_api(run_dir, photos, capsys):
    """Each image samples from its own stream (its index on the command line), as
    fastcap.load(...).caption(seed=) and the server do. main seeded one generator per batch, so
    --batch-size 1 and 3 gave different captions (and the second batch replayed the first's
    draws)."""
    import fastcap

    good = [photos[k] for k in ("rgb", "gray", "palette")]
    args = [str(run_dir), *map(str, good), "--strategy", "sample", "--seed", "7", "--json"]
    args += ["--temperature", "1.5", "--top-p", "0.9", "--top-k", "0"]
    outs = []
    for bs in ("1", "3"):
        assert caption_cli.main([*args, "--batch-size", bs]) == 0
        outs.append([r["captions"][0]["caption"] for r in json.loads(capsys.readouterr().out)])
    assert outs[0] == outs[1]
    cap = fastcap.load(run_dir, device="cpu", dtype=torch.float32)
    api = cap.caption(good, strategy="sample", seed=7, temperature=1.5, top_p=0.9, top_k=0)
    assert outs[0] == [c.text for c in api]


def test_folders_and_globs(run_dir, photos, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in ("gray", "rgba"):
        shutil.copy(photos[k], folder / photos[k].name)
    (folder / "notes.txt").write_text("not an image")
    pattern = str(photos["rgb"].parent / photos["rgb"].name[:8]) + "*.jpg"
    rc = caption_cli.main([str(run_dir), str(folder), pattern, str(tmp_path / "missing.jpg")])
    cap = capsys.readouterr()
    assert rc == 1 and "missing.jpg" in cap.err
    paths = [line.split("\t")[0] for line in _lines(cap.out)]
    assert paths[:2] == [str(folder / "gray.png"), str(folder / "rgba.png")]
    assert str(photos["rgb"]) in paths


def test_attention_maps(run_dir, photos, tmp_path, capsys):
    maps = tmp_path / "maps"
    good = [photos[k] for k in ("rgb", "gray", "palette")]
    rc = caption_cli.main(
        [str(run_dir), *map(str, good), "--attention-maps", str(maps), "--min-new-tokens", "3"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    for p in good:
        png = maps / f"{p.stem}.png"
        im = Image.open(png)
        im.load()
        assert im.mode == "RGB" and im.width >= 256 and im.height > 256 + 112
    assert len(_lines(out)) == 3


def test_attention_maps_sum_to_one_per_token(run_dir):
    from fastcap.attention_maps import cross_attention_maps, word_spans
    from fastcap.generate import greedy

    model, tok, _ = load_run(run_dir, "cpu")
    x = torch.randn(3, 3, 32, 32)
    g = greedy(model, x, min_new_tokens=2, max_new_tokens=8)
    maps = cross_attention_maps(model, x, g.tokens, g.lens)
    grid = model.vision.grid
    assert maps.shape == (3, g.tokens.shape[1], grid, grid)
    live = torch.arange(g.tokens.shape[1])[None, :] < g.lens[:, None]
    torch.testing.assert_close(maps.sum((2, 3))[live], torch.ones(int(live.sum())))
    assert (maps.sum((2, 3))[~live] == 0).all()
    words = ["a", "big", "red", "circle", "left", "of", "a", "small", "blue", "square"]
    ids = tok.encode(" ".join(words))
    spans = word_spans(tok, ids + [tok.eos_id])
    assert [w for w, _ in spans] == words
    assert sorted(i for _, pos in spans for i in pos) == list(range(len(ids)))


def test_load_run_round_trip(run_dir):
    model, tok, cfg = load_run(run_dir, "cpu")
    state = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.training and cfg.model.vocab_size == tok.vocab_size


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--strategy", "nucleus"], "unknown strategy"),
        (["--strategy", "sample", "--top-p", "0"], "top_p"),
        (["--strategy", "sample", "--top-p", "1.5"], "top_p"),
        (["--strategy", "beam", "--num-beams", "0"], "num_beams"),
    ],
)
def test_bad_arguments_exit_2(run_dir, photos, capsys, args, needle):
    for main in (caption_cli.main, None):
        if main is None:
            rc = eval_cli.main([str(run_dir), *args])
        else:
            rc = main([str(run_dir), str(photos["rgb"]), *args])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(_lines(err)) == 1


@pytest.mark.parametrize("missing", ["model.pt", "config.json", "tokenizer.json"])
def test_incomplete_run_folder_exits_2(run_dir, photos, tmp_path, capsys, missing):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    (bad / missing).unlink()
    with pytest.raises(RunError, match=missing):
        load_run(bad)
    for run in (
        lambda: caption_cli.main([str(bad), str(photos["rgb"])]),
        lambda: eval_cli.main([str(bad), "--split", "test"]),
    ):
        rc = run()
        err = capsys.readouterr().err
        assert rc == 2 and missing in err and len(_lines(err)) == 1
        assert "fastcap-train" in err  # names the fix


def test_eval_shapes(run_dir, tiny_shapes, tmp_path, capsys):
    out, res = tmp_path / "m.json", tmp_path / "c.json"
    rc = eval_cli.main(
        [
            str(run_dir),
            "--data",
            f"shapes:{tiny_shapes}",
            "--split",
            "test",
            "--strategy",
            "beam",
            "--num-beams",
            "3",
            "--out",
            str(out),
            "--results",
            str(res),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    for k in (
        "BLEU-1",
        "BLEU-4",
        "METEOR",
        "ROUGE-L",
        "CIDEr-D",
        "semantic_acc",
        "distinct_captions",
        "i2t_R@1",
        "i2t_R@5",
        "t2i_R@1",
        "t2i_R@5",
    ):
        assert k in m and 0.0 <= m[k] <= 10.0, k
    assert m["images"] == 16 and m["strategy"] == "beam"
    captions = json.loads(res.read_text())
    ids = {r.id for r in load_records(tiny_shapes / "dataset.json", tiny_shapes, "test")}
    assert {c["image_id"] for c in captions} == ids
    assert all(set(c) == {"image_id", "caption"} for c in captions)
    assert "CIDEr-D" in capsys.readouterr().out


def test_eval_unknown_split_exits_2(run_dir, capsys):
    rc = eval_cli.main([str(run_dir), "--split", "nosuchsplit", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "nosuchsplit" in err and len(_lines(err)) == 1


def test_eval_real_photos_folder(run_dir, flickr8k_1k, tmp_path, capsys):
    """A folder dataset of real photographs (Flickr8k, captions.txt): first 6 test images."""
    data = flickr8k_1k
    out, res = tmp_path / "m.json", tmp_path / "c.json"
    rc = eval_cli.main(
        [
            str(run_dir), "--data", f"folder:{data}", "--split", "test", "--limit", "6",
            "--strategy", "sample", "--seed", "2", "--out", str(out), "--results", str(res),
            "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    assert m["images"] == 6 and "semantic_acc" not in m
    assert {"BLEU-4", "METEOR", "CIDEr-D", "i2t_R@5", "t2i_R@5"} <= set(m)
    assert len(json.loads(res.read_text())) == 6
