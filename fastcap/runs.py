"""Load a run folder written by ``fastcap-train`` for captioning and evaluation (no DeepSpeed).

A run folder holds ``config.json`` (the TrainConfig), ``tokenizer.json`` and ``model.pt``
(``{"model": fp32 state_dict, "model_config": dict}``). The model is built from the
``model_config`` saved with the weights: it carries the vocabulary size and special ids the
trainer set from the tokenizer, which ``config.json`` (written before that) may not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RunError(ValueError):
    """A run folder that cannot be loaded; the message says what to do."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_run(run_dir, device=None, dtype: str | torch.dtype = "fp32"):
    """-> (Captioner in eval mode on ``device``, CaptionTokenizer, TrainConfig).

    ``device`` defaults to the GPU when there is one. ``dtype``: fp32, fp16 or bf16 (the
    weights are stored in fp32). Raises :class:`RunError` (one line, naming the fix) when the
    folder is not a complete run.
    """
    from fastcap.data.tokenizer import CaptionTokenizer
    from fastcap.model import Captioner
    from fastcap.train.config import from_dict

    p = Path(run_dir)
    if not p.is_dir():
        raise RunError(f"{p}: no such run folder; give the --out folder of a fastcap-train run")
    for name in ("config.json", "tokenizer.json"):
        if not (p / name).is_file():
            raise RunError(
                f"{p} has no {name}: not a fastcap run folder; give the --out folder of a "
                "fastcap-train run"
            )
    if not (p / "model.pt").is_file():
        raise RunError(
            f"{p} has no model.pt (no checkpoint written yet); let fastcap-train reach its first "
            f"checkpoint or finish, or resume it with `fastcap-train --resume {p}`"
        )
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RunError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        train_cfg = from_dict(json.loads((p / "config.json").read_text()))
        blob = torch.load(p / "model.pt", map_location="cpu", weights_only=True)
        state, model_cfg = blob["model"], blob["model_config"]
        tokenizer = CaptionTokenizer.load(p / "tokenizer.json")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunError(
            f"{p}: cannot read the run ({msg}); re-save it with fastcap-train or check the files"
        ) from None
    train_cfg.model = from_dict({"model": model_cfg}).model
    if train_cfg.model.vocab_size != tokenizer.vocab_size:
        raise RunError(
            f"{p}: model.pt has vocab {train_cfg.model.vocab_size} but tokenizer.json has "
            f"{tokenizer.vocab_size}; the files come from different runs"
        )
    model = Captioner(train_cfg.model)
    model.load_state_dict(state)
    device = default_device() if device is None else torch.device(device)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, train_cfg
