"""A run's inputs: the tokenizer (trained on the training captions for a new run, read back
from the run folder on resume) and the train and val splits it encodes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fastcap.data.sources import has_split, open_split, training_captions
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.model import ModelConfig
from fastcap.train.checkpoint import atomic_write
from fastcap.train.config import ConfigError, TrainConfig, to_dict


def with_tokenizer(mc: ModelConfig, tok: CaptionTokenizer) -> ModelConfig:
    """The model config with the vocabulary and special ids of the run's tokenizer."""
    mc.vocab_size, mc.pad_id = tok.vocab_size, tok.pad_id
    mc.bos_id, mc.eos_id = tok.bos_id, tok.eos_id
    return mc


def open_run_data(
    cfg: TrainConfig,
    out: Path,
    *,
    is_main: bool,
    new_run: bool,
    progress: bool,
    tokenizer_from: Path | None = None,
):
    """(tokenizer, train split, val split or None); a new run's rank 0 first writes
    ``tokenizer.json`` (trained on the training captions, or a copy of ``tokenizer_from``: a
    run that starts from another's weights keeps its vocabulary) and ``config.json``; the
    other ranks wait (a collective call) and load it. Only rank 0 reads the training captions
    (of shards: their caption members alone), and each split is opened once."""
    dc = cfg.data
    if not has_split(dc.data, dc.train_split, dc.image_root):
        raise ConfigError(f"{dc.data}: no images in split {dc.train_split!r}")
    tok_path = out / "tokenizer.json"
    if new_run:
        failed = None
        if is_main:
            try:
                if tokenizer_from is not None:
                    atomic_write(tok_path, Path(tokenizer_from).read_bytes())
                else:
                    captions = training_captions(dc.data, dc.train_split, dc.image_root)
                    CaptionTokenizer.train(captions, vocab_size=dc.vocab_size).save(tok_path)
                atomic_write(out / "config.json", json.dumps(to_dict(cfg), indent=2).encode())
            except Exception as e:  # every rank raises, none waits for rank 0 forever
                failed = f"{type(e).__name__}: {e}"
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            vote = [failed]
            torch.distributed.broadcast_object_list(vote, src=0)
            failed = vote[0]
        if failed:
            raise ConfigError(f"{dc.data}: the tokenizer could not be made ({failed})")
        torch.distributed.barrier()
    tok = CaptionTokenizer.load(tok_path)
    mc = with_tokenizer(cfg.model, tok)
    t0 = time.time()
    common = dict(
        image_root=dc.image_root,
        tokenizer=tok,
        image_size=mc.image_size,
        max_len=mc.max_len,
        progress=progress and is_main,
        max_bad_fraction=dc.max_bad_fraction,
    )
    train = open_split(
        dc.data,
        dc.train_split,
        in_memory=dc.in_memory,
        num_workers=dc.num_workers,
        epoch_unit=dc.epoch_unit,
        **common,
    )
    has_val = has_split(dc.data, dc.val_split, dc.image_root)
    val = open_split(dc.data, dc.val_split, in_memory=True, **common) if has_val else None
    if is_main:
        print(
            f"data: {len(train)} train images ({len(train.bad)} skipped), "
            f"{0 if val is None else len(val)} val, vocab {tok.vocab_size}, "
            f"loaded in {time.time() - t0:.1f}s"
        )
    return tok, train, val
