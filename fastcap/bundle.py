"""Inference bundles: the weights as safetensors, the model config as JSON, the tokenizer.

A bundle is a folder of three files and nothing else is needed to caption with it (no
DeepSpeed, no training config, no pickle)::

    model.safetensors   every tensor of the Captioner's state_dict; metadata {"fastcap_bundle": "1"}
    model_config.json   the ModelConfig as a dict (what model.pt stores as "model_config")
    tokenizer.json      the run's tokenizer, as fastcap-train saved it

Nothing in it names a path, so a bundle can be copied or moved anywhere; ``trunk_weights`` (a
path to initial trunk weights, meaningless once the weights are trained) is cleared. A run
folder becomes a bundle too when training writes ``model.safetensors`` and
``model_config.json`` beside ``model.pt`` at its end (the tokenizer is already there).

This module is a leaf: it knows files and tensors, not the model; :mod:`fastcap.runs` decides
whether a folder is a run or a bundle and builds the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
FILES = (WEIGHTS, MODEL_CONFIG, TOKENIZER)
FORMAT_KEY, FORMAT_VERSION = "fastcap_bundle", "1"
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def is_bundle(path: str | Path) -> bool:
    """True when ``path`` is a folder holding the three bundle files."""
    p = Path(path)
    return p.is_dir() and all((p / name).is_file() for name in FILES)


def save_weights(state: dict[str, torch.Tensor], path: str | Path, dtype: str | None = None):
    """state_dict -> safetensors file, atomically (written to ``path.tmp``, then renamed).

    Floating-point tensors are cast to ``dtype`` (fp32, fp16 or bf16) when given. Tensors that
    share memory (tied weights) are stored once each as separate copies: safetensors refuses
    aliases, and ``load_state_dict`` ties them again through the module.
    """
    from safetensors.torch import save_file

    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(SAVE_DTYPES)}")
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(SAVE_DTYPES[dtype])
        ptr = t.untyped_storage().data_ptr() if t.numel() else None  # views share it too
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt", FORMAT_KEY: FORMAT_VERSION})
    os.replace(tmp, path)
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A bundle's safetensors file -> state_dict on the CPU; ValueError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({msg})") from None
    if meta.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a fastcap bundle's weights (metadata {FORMAT_KEY}="
            f"{meta.get(FORMAT_KEY)!r}, expected {FORMAT_VERSION!r}); write it with fastcap-export"
        )
    return state


def portable_model_config(model_config: dict) -> dict:
    """The model config with the machine-specific fields cleared (``trunk_weights``: a path)."""
    cfg = json.loads(json.dumps(model_config))  # a deep copy that also proves it is JSON
    cfg["trunk_weights"] = None
    return cfg


def write_bundle(
    state: dict[str, torch.Tensor],
    model_config: dict,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
) -> Path:
    """Write an inference bundle into ``out_dir`` (created if needed) and return it.

    ``state``: the Captioner's full state_dict (fp32 as training gathers it); ``model_config``:
    the ModelConfig as a dict (``to_dict(cfg)["model"]``); ``tokenizer_path``: the run's
    tokenizer.json (not copied when it already is ``out_dir/tokenizer.json``, as in a run
    folder). ``dtype`` casts the stored floating-point weights (default: as given). Each file
    is written to a temporary name and renamed, so a crash leaves no half-written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(state, out / WEIGHTS, dtype)
    tmp = out / (MODEL_CONFIG + ".tmp")
    tmp.write_text(json.dumps(portable_model_config(model_config), indent=2))
    os.replace(tmp, out / MODEL_CONFIG)
    src, dst = Path(tokenizer_path), out / TOKENIZER
    if not (dst.exists() and src.resolve() == dst.resolve()):
        tmp = out / (TOKENIZER + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return out


def read_bundle(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """-> (state_dict on the CPU, model config dict, tokenizer path). ValueError naming the
    file when one is missing or unreadable."""
    p = Path(path)
    for name in FILES:
        if not (p / name).is_file():
            raise ValueError(
                f"{p} has no {name}: not a complete bundle; write it with fastcap-export"
            )
    try:
        model_config = json.loads((p / MODEL_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{p / MODEL_CONFIG}: not readable JSON ({e})") from None
    if not isinstance(model_config, dict):
        raise ValueError(
            f"{p / MODEL_CONFIG}: expected a JSON object, got {type(model_config).__name__}"
        )
    return load_weights(p / WEIGHTS), model_config, p / TOKENIZER
