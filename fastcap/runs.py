"""Load a trained model for captioning and evaluation (no DeepSpeed): a run folder or a bundle.

Two layouts hold a trained model, and this module is the one place that tells them apart:

- a **run folder**, written by ``fastcap-train``: ``config.json`` (the TrainConfig),
  ``tokenizer.json`` and ``model.pt`` (``{"model": fp32 state_dict, "model_config": dict}``);
  a finished run also holds ``model.safetensors`` and ``model_config.json``, but ``model.pt``
  is what every checkpoint refreshes, so a run folder is always read from it;
- a **bundle** (:mod:`fastcap.bundle`, written by ``fastcap-export``): ``model.safetensors``,
  ``model_config.json`` and ``tokenizer.json``, no training config.

A folder with ``config.json`` is a run folder; one without it but with the bundle's files is a
bundle. The model is built from the model config saved with the weights: it carries the
vocabulary size and special ids the trainer set from the tokenizer, which ``config.json``
(written before that) may not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fastcap import bundle

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUN, BUNDLE = "run", "bundle"
WHAT = "a fastcap-train --out folder or a fastcap-export bundle"


class RunError(ValueError):
    """A run folder or bundle that cannot be loaded; the message says what to do."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kind_of(path) -> str:
    """``RUN`` or ``BUNDLE`` for a folder (see the module docstring); RunError if no folder."""
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"{p}: no such folder; give {WHAT}")
    if (p / "config.json").is_file():
        return RUN
    if (p / bundle.WEIGHTS).is_file() or (p / bundle.MODEL_CONFIG).is_file():
        return BUNDLE
    return RUN  # neither: the run checks below name what is missing


def read_model(path):
    """-> (state_dict on the CPU, model config dict, tokenizer path, TrainConfig or None).

    The TrainConfig comes from a run folder's config.json (with its model section replaced by
    the saved model config); a bundle has none. RunError (one line, naming the fix) when the
    folder is neither a complete run nor a complete bundle.
    """
    from fastcap.train.config import from_dict

    p = Path(path)
    if kind_of(p) == BUNDLE:
        try:
            state, model_cfg, tok_path = bundle.read_bundle(p)
        except ValueError as e:
            raise RunError(str(e)) from None
        return state, model_cfg, tok_path, None
    for name in ("config.json", "tokenizer.json"):
        if not (p / name).is_file():
            raise RunError(
                f"{p} has no {name}: not a fastcap run folder or bundle; give {WHAT} "
                "(the --out folder of a fastcap-train run)"
            )
    if not (p / "model.pt").is_file():
        raise RunError(
            f"{p} has no model.pt (no checkpoint written yet); let fastcap-train reach its first "
            f"checkpoint or finish, or resume it with `fastcap-train --resume {p}`"
        )
    try:
        train_cfg = from_dict(json.loads((p / "config.json").read_text()))
        blob = torch.load(p / "model.pt", map_location="cpu", weights_only=True)
        state, model_cfg = blob["model"], blob["model_config"]
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunError(
            f"{p}: cannot read the run ({msg}); re-save it with fastcap-train or check the files"
        ) from None
    train_cfg.model = from_dict({"model": model_cfg}).model
    return state, model_cfg, p / "tokenizer.json", train_cfg


def load_run(path, device=None, dtype: str | torch.dtype | None = "fp32"):
    """-> (Captioner in eval mode on ``device``, CaptionTokenizer, TrainConfig or None).

    ``path``: a run folder or a bundle; the TrainConfig is None for a bundle. ``device``
    defaults to the GPU when there is one. ``dtype``: fp32, fp16 or bf16 (or a torch dtype);
    None: the capability policy's (:func:`fastcap.common.capability.inference_dtype`: bf16
    from sm_80, fp16 on a T4 or V100, fp32 on a CPU).
    Raises :class:`RunError` (one line, naming the fix) when the folder is neither a complete
    run nor a complete bundle.
    """
    from fastcap.data.tokenizer import CaptionTokenizer
    from fastcap.model import Captioner
    from fastcap.train.config import from_dict

    device = default_device() if device is None else torch.device(device)
    if dtype is None:  # the capability policy's, as fastcap.load and fastcap-serve
        from fastcap.common.capability import inference_dtype

        dtype = inference_dtype(device, "fastcap-caption/fastcap-eval")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RunError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    p = Path(path)
    state, model_cfg, tok_path, train_cfg = read_model(p)
    try:
        tokenizer = CaptionTokenizer.load(tok_path)
        mc = from_dict({"model": model_cfg}).model
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunError(f"{p}: cannot read the model config or tokenizer ({msg})") from None
    if mc.vocab_size != tokenizer.vocab_size:
        raise RunError(
            f"{p}: the weights have vocab {mc.vocab_size} but tokenizer.json has "
            f"{tokenizer.vocab_size}; the files come from different runs"
        )
    # trained weights replace the trunk's initial ones: never read that path (it may not exist
    # on this machine)
    model = Captioner(dataclasses.replace(mc, trunk_weights=None))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise RunError(f"{p}: the weights do not fit the model config ({msg})") from None
    return model.to(device=device, dtype=dtype).eval(), tokenizer, train_cfg


def export(path, out_dir, dtype: str | None = None) -> Path:
    """Write the bundle of a run folder (or of another bundle) into ``out_dir``; -> out_dir.

    ``dtype`` (fp32, fp16, bf16) casts the stored weights; default: as stored (fp32).
    """
    from fastcap.data.tokenizer import CaptionTokenizer

    state, model_cfg, tok_path, _ = read_model(path)
    try:
        CaptionTokenizer.load(tok_path)  # a bundle must not carry a tokenizer that cannot load
    except Exception as e:  # tokenizers raises its own Exception type
        raise RunError(f"{tok_path}: not a readable tokenizer ({e})") from None
    try:
        return bundle.write_bundle(state, model_cfg, tok_path, out_dir, dtype)
    except ValueError as e:
        raise RunError(str(e)) from None
