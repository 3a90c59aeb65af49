"""The README's many-nodes recipe as written: shards from `fastcap-data shard`, then
`fastcap-train --preset coco-base --data 'wds:.../{split}-{...}.tar' data.num_workers=N` on two
gloo ranks (torchrun standing in for the deepspeed launcher), with only the model made tiny.
coco-base's caption epoch runs over the shards (captions.json counts the captions), and only
rank 0 reads the training captions, once, for the tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.data.wds import WdsSet
from tests.test_train import run_two_ranks

TINY_MODEL = [
    "model.trunk_weights=none", "model.image_size=64", "model.width=64", "model.heads=4",
    "model.encoder_layers=1", "model.unimodal_layers=1", "model.multimodal_layers=1",
    "model.embed_dim=32", "model.max_len=24", "data.vocab_size=64", "eval_samples=8",
]  # fmt: skip


def _shard(tiny_shapes: Path, out: Path) -> None:
    exe = Path(sys.executable).parent / "fastcap-data"
    for split, size in (("train", 24), ("val", 16), ("test", 16)):
        subprocess.run(
            [
                str(exe),
                "shard",
                "--from",
                str(tiny_shapes / "dataset.json"),
                "--out",
                str(out),
                "--shard-size",
                str(size),
                "--split",
                split,
            ],  # fmt: skip
            check=True,
            capture_output=True,
            timeout=300,
        )


def test_a_caption_epoch_over_shards_reads_every_caption_once(tiny_shapes, tmp_path):
    """main: open_split refused epoch_unit=caption for wds: ('needs an indexable split')."""
    _shard(tiny_shapes, tmp_path)
    caps = json.loads((tmp_path / "captions.json").read_text())
    assert set(caps) >= {f"train-{i:06d}.tar" for i in range(4)}
    tok = CaptionTokenizer.train(["a red circle"] * 10, 64)
    pattern = f"{tmp_path}/train-{{000000..000003}}.tar"
    ws = WdsSet(pattern, "train", tok, 16, 24, world=1, epoch_unit="caption")
    n = sum(caps[f"train-{i:06d}.tar"] for i in range(4))
    assert ws.steps_per_epoch(8) == n // 8 > len(ws) // 8
    pairs = [(i, tuple(t[:k].tolist())) for b in ws.batches(0, 0, 8, seed=3)
             for i, t, k in zip(b.ids, b.tokens, b.lens)]  # fmt: skip
    assert len(pairs) == (n // 8) * 8 and len(set(pairs)) >= len(pairs) - 1  # each caption once


def test_the_readme_recipe_on_two_ranks(tiny_shapes, tmp_path):
    """main: 'wds:...: epoch_unit 'caption' needs an indexable split', after every rank had
    read every shard (images included) for the tokenizer's captions."""
    _shard(tiny_shapes, tmp_path / "wds")
    out = tmp_path / "run"
    r = run_two_ranks(
        ["-m", "fastcap.cli.train"],
        [
            "--preset",
            "coco-base",
            "--data",
            f"wds:{tmp_path}/wds/{{split}}-{{000000..000003}}.tar",
            "--out",
            str(out),
            "data.num_workers=1",
            *TINY_MODEL,
            "--steps",
            "2",
            "--batch-size",
            "8",
        ],  # fmt: skip
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "epoch_unit" not in r.stderr
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and log[-1]["step"] == 2 if "step" in log[-1] else True
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test" in metrics
