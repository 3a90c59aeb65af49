"""Run folders and checkpoints: atomic writes, the engine state with every random generator,
and what ``--resume`` may trust.

A checkpoint is written as ``checkpoints/stepN.tmp/`` by every rank, completed by rank 0 with
``meta.json`` (step, world size, ZeRO stage, parameter shapes), and only then renamed to
``checkpoints/stepN/``. A directory named ``stepN`` is therefore always complete: a crash at any
point (SIGKILL, a full disk) leaves the previous checkpoints untouched, and resume picks the
newest complete one.
``latest`` names it too, for people and for DeepSpeed's own tools.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fastcap.model import Captioner
from fastcap.train.collectives import any_rank
from fastcap.train.config import ConfigError

META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous ones are intact."""


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_model(path: Path, state: dict, model_config: dict) -> None:
    """Full fp32 weights + the model config, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": state, "model_config": model_config}, tmp)
    os.replace(tmp, path)


def check_run_dir(path: str | Path) -> Path:
    """A folder written by fastcap-train (config, tokenizer and a checkpoint or weights)."""
    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "tokenizer.json").is_file():
        raise ConfigError(
            f"{p} is not a fastcap run folder (no config.json/tokenizer.json); "
            "give the --out folder of a fastcap-train run"
        )
    return p


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoint tags under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step") and "." not in p.name and (p / META).is_file()
    )


def resumable_tag(run: Path) -> str:
    """The newest complete checkpoint of a run folder; ConfigError when there is none."""
    tags = complete_tags(run / "checkpoints")
    if not tags:
        raise ConfigError(f"{run} has no complete checkpoint to resume from (checkpoints/ empty)")
    return tags[-1]


def model_shapes(model_config) -> dict[str, list[int]]:
    """Tensor shapes of the captioner a model config builds (on the meta device: no memory,
    no work, the global RNG untouched)."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        m = Captioner(model_config)
    return {k: list(v.shape) for k, v in m.state_dict().items()}


def check_compatible(run: Path, tag: str, shapes: dict[str, list[int]], layout: dict) -> None:
    """The model the (possibly hand-edited) config builds must have the checkpoint's tensors,
    and the engine must be laid out as it was (ranks, ZeRO stage: DeepSpeed's partitioned
    states load only into the same layout)."""
    meta = json.loads((run / "checkpoints" / tag / META).read_text())
    was = {k: meta[k] for k in layout if k in meta}
    if was and was != {k: layout[k] for k in was}:
        raise ConfigError(
            f"--resume {run}: checkpoint {tag} was written with "
            + ", ".join(f"{k}={v}" for k, v in was.items())
            + "; resume with the same layout (now "
            + ", ".join(f"{k}={layout[k]}" for k in was)
            + ")"
        )
    saved = meta["shapes"]
    missing = sorted(set(saved) - set(shapes))
    extra = sorted(set(shapes) - set(saved))
    wrong = [k for k in saved if k in shapes and list(shapes[k]) != list(saved[k])]
    if missing or extra or wrong:
        if wrong:
            k = wrong[0]
            what = f"{k} is {tuple(shapes[k])} in this config, {tuple(saved[k])} in {tag}"
        else:
            k = (missing or extra)[0]
            what = f"{k} is {'missing from this config' if missing else 'not in ' + tag}"
        raise ConfigError(
            f"--resume {run}: its config.json no longer builds the model of checkpoint {tag} "
            f"({len(wrong) + len(missing) + len(extra)} tensors differ; {what}); restore "
            f"config.json or start a new run with --out"
        )


# ---------------------------------------------------------------------- random state
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(tf_gen: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tf": tf_gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict, tf_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tf_gen.set_state(state["tf"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- save / load
def save(
    engine,
    root: Path,
    *,
    step: int,
    client: dict,
    tf_gen: torch.Generator,
    rank: int,
    device: torch.device,
    shapes: dict[str, list[int]],
    layout: dict,
    keep: int,
) -> bool:
    """Write checkpoint ``stepN`` (a collective call). Returns False when a complete
    checkpoint of this step already exists (the state is the same: nothing is rewritten).

    Raises CheckpointError, on every rank, when any rank failed to write (a full disk): the
    partial directory is removed and the previous checkpoints stay as they were.
    """
    tag = tag_of(step)
    tmp = root / (tag + ".tmp")
    if (root / tag / META).is_file():
        return False
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, client_state=client, save_latest=False)
        torch.save(rng_state(tf_gen), tmp / f"rng_rank{rank}.pt")
    except OSError as e:  # ENOSPC, EDQUOT, EIO: the run cannot go on, the old state is fine
        error = e
    failed = any_rank(error is not None, device)
    if rank == 0:
        try:
            if not failed:
                meta = {"step": step, **layout, "shapes": shapes}
                atomic_write(tmp / META, json.dumps(meta).encode())
                _publish(root, tmp, tag, keep)
        except OSError as e:
            error, failed = error or e, True
        if failed:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = any_rank(failed, device)
    if failed:
        prev = complete_tags(root)
        kept = f"the previous checkpoint {prev[-1]} is intact" if prev else "no checkpoint kept"
        reason = error if error is not None else "another rank failed to write"
        raise CheckpointError(
            f"checkpoint {tag} could not be written to {root} ({reason}); {kept}: free space, "
            f"then continue with --resume {root.parent}"
        )
    return True


def _publish(root: Path, tmp: Path, tag: str, keep: int) -> None:
    """Rename the finished directory into place, point ``latest`` at it, prune old ones."""
    shutil.rmtree(root / tag, ignore_errors=True)  # an incomplete leftover of the same name
    os.replace(tmp, root / tag)
    atomic_write(root / "latest", tag.encode())
    for old in complete_tags(root)[:-keep]:
        shutil.rmtree(root / old, ignore_errors=True)
    for stale in root.glob("step*.tmp"):  # left by a crash inside an earlier save
        shutil.rmtree(stale, ignore_errors=True)


def load(engine, root: Path, tag: str, rank: int, tf_gen: torch.Generator) -> dict:
    """Restore the engine and every RNG from ``tag``; returns the client state."""
    _, client = engine.load_checkpoint(str(root), tag=tag)
    set_rng_state(torch.load(root / tag / f"rng_rank{rank}.pt", weights_only=False), tf_gen)
    return client
