"""Inference bundles: fastcap-export writes model.safetensors + model_config.json +
tokenizer.json; a bundle moved to another folder loads and captions exactly like its run
folder, without DeepSpeed; the safetensors round trip; fastcap-caption and fastcap-eval take
either; incomplete or foreign bundles are one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastcap
from fastcap import bundle
from fastcap.cli import caption as caption_cli
from fastcap.cli import eval as eval_cli
from fastcap.cli import export as export_cli
from fastcap.runs import BUNDLE, RUN, RunError, kind_of, load_run


@pytest.fixture(scope="session")
def images(tiny_shapes) -> list[Path]:
    return sorted((tiny_shapes / "test").glob("*.png"), key=lambda p: int(p.stem))[:6]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "bundle"
    assert export_cli.main([str(tiny_run), "--out", str(out)]) == 0
    return out


def _captions(cap, images, **kw):
    return [(c.text, c.logprob, c.tokens) for c in cap.caption(images, **kw)]


def test_export_holds_three_files_and_no_path(exported, tiny_run):
    assert sorted(p.name for p in exported.iterdir()) == sorted(bundle.FILES)
    cfg = json.loads((exported / "model_config.json").read_text())
    run_cfg = torch.load(tiny_run / "model.pt", weights_only=True)["model_config"]
    assert cfg == {**run_cfg, "trunk_weights": None}
    assert str(tiny_run) not in (exported / "model_config.json").read_text()
    assert (exported / "tokenizer.json").read_bytes() == (tiny_run / "tokenizer.json").read_bytes()
    assert kind_of(exported) == BUNDLE and kind_of(tiny_run) == RUN


def test_moved_bundle_captions_like_the_run(exported, tiny_run, images, tmp_path):
    moved = tmp_path / "elsewhere" / "my-model"
    moved.parent.mkdir()
    shutil.copytree(exported, tmp_path / "copy")
    shutil.move(str(tmp_path / "copy"), str(moved))  # a new folder, the old one gone
    assert not (tmp_path / "copy").exists()
    run, moved_cap = fastcap.load(tiny_run, device="cpu"), fastcap.load(moved, device="cpu")
    run_state, bundle_state = run.model.state_dict(), moved_cap.model.state_dict()
    assert run_state.keys() == bundle_state.keys()
    for k in run_state:
        assert torch.equal(run_state[k], bundle_state[k]), k
    for kw in ({}, {"strategy": "beam", "num_beams": 3}):
        assert _captions(moved_cap, images, **kw) == _captions(run, images, **kw)
    _, _, cfg = load_run(moved, "cpu")
    assert cfg is None  # a bundle has no training config


def test_a_bundle_loads_without_deepspeed(exported, images):
    code = (
        "import sys; sys.modules['deepspeed'] = None; sys.modules['wandb'] = None\n"
        "import fastcap\n"
        f"c = fastcap.load({str(exported)!r}, device='cpu')\n"
        f"print(c.caption({str(images[0])!r}).text)\n"
        "assert 'deepspeed' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == fastcap.load(exported, device="cpu").caption(images[0]).text


def test_safetensors_round_trip(tmp_path):
    w = torch.randn(5, 3)
    state = {
        "a.weight": w,
        "tied.weight": w,  # the same tensor under two names (tied embeddings)
        "view": w[1:3],  # a view into it
        "t": torch.randn(4, 6).t(),  # not contiguous
        "steps": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "half": torch.randn(3, dtype=torch.bfloat16),
    }
    path = bundle.save_weights(state, tmp_path / "w.safetensors")
    back = bundle.load_weights(path)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert not (tmp_path / "w.safetensors.tmp").exists()
    half = bundle.load_weights(bundle.save_weights(state, tmp_path / "h.safetensors", "fp16"))
    assert half["a.weight"].dtype == torch.float16 and half["half"].dtype == torch.float16
    assert half["steps"].dtype == torch.int64 and int(half["steps"]) == 7
    torch.testing.assert_close(half["a.weight"].float(), w, atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        bundle.save_weights(state, tmp_path / "x.safetensors", "fp8")


def test_foreign_or_broken_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a fastcap bundle's weights.*fastcap-export"):
        bundle.load_weights(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        bundle.load_weights(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("missing", bundle.FILES)
def test_incomplete_bundle_is_one_line_error(exported, tmp_path, images, capsys, missing):
    bad = tmp_path / "b"
    shutil.copytree(exported, bad)
    (bad / missing).unlink()
    with pytest.raises(RunError, match=f"has no {missing}"):
        fastcap.load(bad, device="cpu")
    rc = caption_cli.main([str(bad), str(images[0])])
    err = capsys.readouterr().err
    assert rc == 2 and missing in err and len(err.strip().splitlines()) == 1


def test_mismatched_files_are_refused(exported, tmp_path, tiny_shapes):
    from fastcap.data.tokenizer import CaptionTokenizer

    other = tmp_path / "other-vocab"
    shutil.copytree(exported, other)
    CaptionTokenizer.train(["a red circle", "a blue square"] * 10, vocab_size=40).save(
        other / "tokenizer.json"
    )
    with pytest.raises(RunError, match="vocab 64 but tokenizer.json has"):
        load_run(other, "cpu")
    wrong = tmp_path / "wrong-config"
    shutil.copytree(exported, wrong)
    cfg = json.loads((wrong / "model_config.json").read_text())
    (wrong / "model_config.json").write_text(json.dumps({**cfg, "width": 32}))
    with pytest.raises(RunError, match="do not fit the model config"):
        load_run(wrong, "cpu")


def test_export_fp16_and_errors(tiny_run, tmp_path, images, capsys):
    out = tmp_path / "fp16"
    assert export_cli.main([str(tiny_run), "--out", str(out), "--dtype", "fp16"]) == 0
    assert "wrote" in capsys.readouterr().out
    full = (tiny_run / "model.pt").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.6 * full
    c16 = fastcap.load(out, device="cpu")
    assert c16.dtype == torch.float32  # stored in fp16, run in the dtype asked for
    assert (
        c16.caption(images[0]).text == fastcap.load(tiny_run, device="cpu").caption(images[0]).text
    )
    # a bundle exports again (a copy); a folder that is neither is a one-line error
    assert export_cli.main([str(out), "--out", str(tmp_path / "again")]) == 0
    assert bundle.is_bundle(tmp_path / "again")
    rc = export_cli.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such folder" in err and not (tmp_path / "x").exists()


def test_training_end_writes_the_bundle_into_the_run(tiny_run, tmp_path, images):
    """write_bundle(state, model_config, run/tokenizer.json, run): the trainer's last save.
    The run folder stays a run folder (read from model.pt); its three bundle files alone are a
    bundle with the same captions."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    blob = torch.load(run / "model.pt", weights_only=True)
    bundle.write_bundle(blob["model"], blob["model_config"], run / "tokenizer.json", run)
    assert (run / "model.safetensors").is_file() and (run / "model.pt").is_file()
    assert kind_of(run) == RUN and load_run(run, "cpu")[2] is not None
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in bundle.FILES:
        shutil.copy(run / name, alone / name)
    want = _captions(fastcap.load(tiny_run, device="cpu"), images)
    assert _captions(fastcap.load(alone, device="cpu"), images) == want


def test_trunk_weights_path_is_never_read(tiny_run, tmp_path, images):
    """A run trained from initial trunk weights names their path; on another machine that path
    is gone, and neither the run nor its bundle needs it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    blob = torch.load(run / "model.pt", weights_only=True)
    blob["model_config"]["trunk_weights"] = str(tmp_path / "gone" / "resnet18.pt")
    torch.save(blob, run / "model.pt")
    want = _captions(fastcap.load(tiny_run, device="cpu"), images)
    assert _captions(fastcap.load(run, device="cpu"), images) == want
    out = fastcap.runs.export(run, tmp_path / "b")
    assert json.loads((out / "model_config.json").read_text())["trunk_weights"] is None


def test_fastcap_caption_takes_a_run_or_a_bundle(tiny_run, exported, images, tmp_path, capsys):
    outs = []
    for path in (tiny_run, exported):
        rc = caption_cli.main(
            [str(path), *map(str, images), "--json", "--strategy", "beam", "--num-beams", "2"]
        )
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        outs.append(json.loads(cap.out))
    assert outs[0] == outs[1] and len(outs[0]) == len(images)
    maps = tmp_path / "maps"
    assert caption_cli.main([str(exported), str(images[0]), "--attention-maps", str(maps)]) == 0
    assert (maps / f"{images[0].stem}.png").is_file()


def test_fastcap_eval_on_a_bundle_needs_data(exported, tiny_shapes, tmp_path, capsys):
    rc = eval_cli.main([str(exported), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--data" in err and len(err.strip().splitlines()) == 1
    out, res = tmp_path / "m.json", tmp_path / "c.json"
    rc = eval_cli.main(
        [
            str(exported), "--data", f"shapes:{tiny_shapes}", "--split", "test", "--limit", "4",
            "--out", str(out), "--results", str(res), "--no-progress", "--no-retrieval",
        ]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    assert m["images"] == 4 and "BLEU-4" in m and "semantic_acc" in m
