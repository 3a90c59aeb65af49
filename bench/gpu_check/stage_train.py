"""Stage ``train``: the product itself, ``fastcap-train`` under DeepSpeed ZeRO-3, trained twice on
the shapes data from the same seed, with ``FASTCAP_KERNELS=ref`` and with the kernels: losses
side by side, images/s, tokens/s, MFU and peak memory, read from each run's ``train_log.jsonl``.

Items, in order:

* ``train/deepspeed``  DeepSpeed importable, else installed from the wheels of ``make
  gpu-wheels`` (``--wheels``, default ``.gpu-wheels/``) into a ``pip --target`` folder
  (:mod:`.wheels`); no wheels there: the stage is skipped and says how to make them.
* ``train/data``       the shapes dataset, written by :func:`fastcap.data.shapes.generate`.
* ``train/ref``, ``train/<kernels>``  ``python -m fastcap.cli.train`` in a subprocess, its
  ``PYTHONPATH`` the checkout laid out as installed (:func:`.harness.package_root`: there is no
  ``pip install -e .`` on a bare machine) plus the ``--target`` folder. No evaluation split, no
  periodic evaluation, W&B disabled: neither pycocoevalcap, Java nor wandb is needed.
* ``train/compare``    the gate (:func:`compare`).

On a GPU: the capability policy's precision (bf16 from sm_80, fp16 with loss scaling on a
T4), 50 steps (``--quick``: 20), the second run ``auto``. On a CPU (``--dry-run``):
the tiny model in fp32 for a few steps, and since ``auto`` is ``ref`` for CPU tensors, the
second run forces ``triton`` (the interpreter; the interpreter's bf16 is wrong) for every op
whose kernel runs here: the same CLI path, comparing two implementations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flops import bf16_peak_tflops, model_flops_per_image

from .harness import Report, Skip, package_root
from .wheels import check_resolves, install


@dataclasses.dataclass(frozen=True)
class Size:
    """One comparison's shape: the product's own flags and config overrides."""

    steps: int
    """Optimiser steps per run."""
    batch: int
    """Global batch (one rank)."""
    images: int
    """Training images generated (the batches cycle through them)."""
    image_size: int
    """Shapes canvas and model input side, in pixels."""
    warmup: int
    """Linear LR warm-up steps (``optim.warmup_steps``): the preset's 100 would never end."""
    skip: int
    """Logged steps left out of the throughput medians (Triton compiles and autotunes in the
    first steps of the kernels run)."""
    overrides: tuple[str, ...]
    """Model settings on top of the ``shapes-tiny`` preset."""


# shapes-tiny with routed experts (so every kernel runs) and head dim 64, the correctness and
# timing stages' head dim (their compiled kernels are reused). A batch of 256 keeps the H200
# busier than the preset's 128; each run must stay far inside the stage's limit.
GPU = Size(
    steps=50,
    batch=256,
    images=2048,
    image_size=64,
    warmup=10,
    skip=10,
    overrides=("model.heads=2", "model.moe.enabled=true"),
)
TINY = (  # tests/conftest.py's tiny model, with routed experts and 2 heads
    "model.width=64",
    "model.heads=2",
    "model.encoder_layers=1",
    "model.unimodal_layers=1",
    "model.multimodal_layers=1",
    "model.embed_dim=32",
    "model.max_len=24",
    "data.vocab_size=64",
    "model.moe.enabled=true",
)
# The interpreter's cost is mostly per launch, not per element: three steps at batch 4 took
# 16-24 s in the kernels run (2026-12-01, 2 cores at load average 5-8), six at batch 8, 130 s.
DRY = Size(steps=3, batch=4, images=64, image_size=32, warmup=1, skip=1, overrides=TINY)

# How close the two loss curves must be. Step 1 has the same weights and the same batch in both
# runs, so its loss differs only by the forward's rounding: bf16 keeps 8 significant bits
# (relative rounding 2^-9 ~ 2e-3 per operation) and a loss passes through some ten rounded
# operations, hence 2e-2 relative; fp32 (CPU, the interpreter against the references) agrees
# to ~1e-6. After that the rounding differences compound through the AdamW updates: in fp32 the
# curves still agree to 1e-3 at every step (measured 2026-12-01 through fastcap-train: step 1
# 2e-7 relative, at most 1e-6 over the three steps; before, with the stage's own loop, a 1% too
# large attention output moved the losses by 5.9e-3); in bf16 the
# trajectories drift apart, so only the mean of the last steps is bounded, by 0.25 (about 10%
# of the loss reached after 50 steps): a kernel with a wrong gradient trains visibly worse. The
# bf16 bounds are a first estimate, not yet read off a GPU run; fp16 (sm_70/sm_75, where the
# policy trains in fp16) keeps 11 bits, 8x finer, and gets the same bounds (its loss scaling
# skips steps the bf16 runs take, so the curves may part as much).
TOL = {
    "fp32": {"first_rel": 1e-4, "max_abs": 1e-3},
    "bf16": {"first_rel": 2e-2, "final_abs": 0.25},
    "fp16": {"first_rel": 2e-2, "final_abs": 0.25},
}
BIG = 10**9  # eval_every / save_every: never inside the run
_DISPATCH = re.compile(r"fastcap\.ops: (\w+) (?:-> (\w+)|falls back to (ref)) \(auto\)")


@contextlib.contextmanager
def _flag(spec: str):
    """``FASTCAP_KERNELS=spec`` in this process for the duration."""
    from fastcap.ops import dispatch

    old = os.environ.get(dispatch.ENV)
    os.environ[dispatch.ENV] = spec
    try:
        yield dispatch
    finally:
        if old is None:
            os.environ.pop(dispatch.ENV, None)
        else:
            os.environ[dispatch.ENV] = old


def _kernels_spec(cuda: bool, dev) -> tuple[str, str]:
    """(label, FASTCAP_KERNELS) of the run compared with ``ref``."""
    if cuda:
        return "auto", "auto"
    parts = []
    with _flag("") as dispatch:
        for op in dispatch.OPS:  # an op whose kernel cannot run here stays ref; the JSON says so
            os.environ[dispatch.ENV] = f"{op}=triton"
            try:
                parts.append(f"{op}={dispatch.resolve(op, dev)}")
            except (ValueError, RuntimeError):
                parts.append(f"{op}=ref")
    return "triton", ",".join(parts)


def _resolved(spec: str, dev) -> dict[str, str]:
    """What ``spec`` selects on this machine: the child runs the same code on the same device.
    An op whose kernel module is not in this checkout is marked ``ref (no kernel)``."""
    out = {}
    with _flag(spec) as dispatch:
        for op in dispatch.OPS:
            impl = dispatch.resolve(op, dev)
            module = dispatch.IMPLS[op]["triton"].split(":")[0]
            if impl == "ref" and importlib.util.find_spec(module) is None:
                impl = "ref (no kernel)"
            out[op] = impl
    return out


def _deepspeed(wheels: Path, target: Path) -> dict:
    """DeepSpeed importable in this process and the runs: installed already, or from ``wheels``."""
    if importlib.util.find_spec("deepspeed") is not None:
        v = importlib.metadata.version("deepspeed")
        return {"deepspeed": v, "installed": [], "summary": f"deepspeed {v} already installed"}
    if not any(wheels.glob("*.whl")):
        raise Skip(
            f"deepspeed is not installed and {wheels} holds no wheels: run `make gpu-wheels` "
            "where PyPI is reachable and carry .gpu-wheels to this machine"
        )
    t0 = time.perf_counter()
    res = install(wheels, target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    import deepspeed

    res["deepspeed"] = deepspeed.__version__
    res["install_seconds"] = round(time.perf_counter() - t0, 1)
    res["summary"] = f"installed {len(res['installed'])} wheels (deepspeed {deepspeed.__version__})"
    return res


def wheels_python(wheels: Path) -> str:
    """The Python (X.Y) the wheels were made for, from a compiled wheel's ``cpXY`` tag (this
    Python's if none has one)."""
    for whl in wheels.glob("*-cp3*-cp3*.whl"):
        tag = whl.name.split("-")[2]  # cp312
        return f"{tag[2]}.{tag[3:]}"
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _summarised(res: dict) -> dict:
    res["summary"] = (
        f"{len(res['resolved'])} distributions resolve offline for Python "
        f"{res['python_version']} ({', '.join(res['from_machine'])} from the machine)"
    )
    return res


def _data(out: Path, size: Size) -> dict:
    from fastcap.data.shapes import generate

    generate(
        out, train=size.images, val=0, test=0, compositional=0, size=size.image_size, progress=False
    )
    return {"path": str(out), "train_images": size.images, "image_size": size.image_size}


def zero3_config(work: Path) -> list[str]:
    """``--config FILE`` that selects ZeRO-3 where the trainer would pick another stage for one
    rank (a config with ``zero_stage``); nothing where ZeRO-3 is the only stage. A file, since
    an ``int | None`` field given on the command line stays a string (``config._coerce``)."""
    from fastcap.train.config import TrainConfig

    if "zero_stage" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return []
    path = work / "zero3.json"
    path.write_text(json.dumps({"zero_stage": 3}))
    return ["--config", str(path)]


def train_command(
    data: Path, out: Path, size: Size, precision: str, config: list[str]
) -> list[str]:
    """The ``fastcap-train`` command line of one run."""
    return [
        sys.executable,
        "-m",
        "fastcap.cli.train",
        *config,
        "--no-progress",
        "--wandb",
        "disabled",
        "--data",
        f"shapes:{data}",
        "--out",
        str(out),
        "--steps",
        str(size.steps),
        "--seed",
        "0",
        "--batch-size",
        str(size.batch),
        f"precision={precision}",
        f"model.image_size={size.image_size}",
        *size.overrides,
        f"optim.warmup_steps={size.warmup}",
        "log_every=1",
        "diag_every=0",
        f"eval_every={BIG}",
        f"save_every={BIG}",
        "data.eval_splits=",
    ]


def _tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def train_precision(dev) -> str:
    """What fastcap-train's ``precision=auto`` picks on ``dev`` (the capability policy), given
    explicitly so that the model line can be checked against it."""
    from fastcap.common.capability import precision_for

    return precision_for(dev)


def _train(
    cmd: list[str],
    out: Path,
    env: dict,
    timeout: float | None,
    size: Size,
    cuda: bool,
    precision: str,
) -> dict:
    """Run one fastcap-train and read what it wrote: the model line, the dispatch log lines,
    train_log.jsonl (per-step losses, median throughput after warm-up, peak memory), MFU."""
    out.parent.mkdir(parents=True, exist_ok=True)
    so, se = out.parent / f"{out.name}.stdout.txt", out.parent / f"{out.name}.stderr.txt"
    t0 = time.perf_counter()
    with open(so, "w") as fo, open(se, "w") as fe:
        try:
            # cwd: ``-m`` puts it first on sys.path, and the checkout's root would shadow the
            # package root (its fastcap/ has no kernels/)
            run = dict(stdout=fo, stderr=fe, env=env, timeout=timeout, cwd=out.parent)
            proc = subprocess.run(cmd, **run)
        except subprocess.TimeoutExpired:
            proc = None
    wall = time.perf_counter() - t0
    log = out / "train_log.jsonl"
    recs = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    recs = [r for r in recs if "loss/total" in r]
    if proc is None or proc.returncode:
        why = f"ran past {timeout:.0f} s" if proc is None else f"exited {proc.returncode}"
        raise RuntimeError(
            f"fastcap-train {why} after {len(recs)} logged steps; stderr: {_tail(se)}"
        )
    stdout = so.read_text(errors="replace")
    model_line = next((x for x in stdout.splitlines() if x.startswith("model: ")), "")
    want = [f"| {precision} | ZeRO-3 |", f"on {'cuda' if cuda else 'cpu'}", "kernels: "]
    if not all(w in model_line for w in want):
        raise AssertionError(f"the model line {model_line!r} lacks one of {want}")
    if len(recs) != size.steps:
        raise AssertionError(f"{len(recs)} logged steps, expected {size.steps}")
    logged = {}
    for m in _DISPATCH.finditer(se.read_text(errors="replace")):
        logged[m.group(1)] = m.group(2) or "ref (fell back)"
    warm = recs[size.skip :] or recs[-1:]
    ips = statistics.median(r["perf/images_per_s"] for r in warm)
    tps = statistics.median(r["perf/tokens_per_s"] for r in warm)
    res = {
        "model_line": model_line,
        "kernels_logged": logged,
        "losses": [r["loss/total"] for r in recs],  # unrounded: compare checks identity
        "ce": [r["loss/ce"] for r in recs],
        "images_per_s": round(ips, 1),
        "tokens_per_s": round(tps, 1),
        "step_ms": round(size.batch / ips * 1e3, 2),
        # the trainer logs CUDA memory only
        "peak_mib": round(max(r["mem/max_allocated_mib"] for r in recs), 1) if cuda else None,
        "wall_s": round(wall, 1),
    }
    res |= _mfu(out, ips, tps / ips, cuda)
    res["summary"] = (
        f"loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}, {res['images_per_s']:.0f} "
        f"img/s, {res['wall_s']:.0f} s in all"
    )
    return res


def _mfu(run: Path, images_per_s: float, tokens_per_image: float, cuda: bool) -> dict:
    """Model TFLOP/s from bench/flops.py's count for the run's own model config (the vocabulary
    is the trained tokenizer's, saved in model.pt) and the mean caption length, over the bf16
    data-sheet peak of the device."""
    import torch

    from fastcap.train.config import from_dict

    blob = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    cfg = from_dict({"model": blob["model_config"]}).model
    tflops = model_flops_per_image(cfg, round(tokens_per_image)) * images_per_s / 1e12
    peak = bf16_peak_tflops(torch.cuda.get_device_name()) if cuda else None
    return {
        "caption_len": round(tokens_per_image, 2),
        "model_tflops": round(tflops, 4),
        "mfu": round(tflops / peak, 5) if peak else None,
        "bf16_peak_tflops": peak,
    }


def _measured_matmul_tflops(out: Path) -> float | None:
    """The bf16 matmul rate the env stage measured in this check, if it ran."""
    try:
        items = json.loads((out / "env.json").read_text())["items"]
    except (OSError, ValueError, KeyError):
        return None
    return next((i["tflops"] for i in items if i["name"].startswith("matmul_bf16")), None)


def compare(ref: dict, other: dict, label: str, precision: str) -> dict:
    """The gate: both curves finite and falling, not identical (the kernels ran), ``other``'s
    ops not the references, and the two curves within :data:`TOL` of each other."""
    a, b = ref["losses"], other["losses"]
    if len(a) != len(b) or not a:
        raise AssertionError(f"the runs logged {len(a)} and {len(b)} steps")
    for name, v in (("ref", a), (label, b)):
        if not all(math.isfinite(x) for x in v):
            raise AssertionError(f"{name}: a non-finite loss: {v}")
        k = max(1, len(v) // 10)
        if not statistics.fmean(v[-k:]) < statistics.fmean(v[:k]):
            raise AssertionError(f"{name}: the loss did not fall: {v}")
    if a == b:
        raise AssertionError(f"{label} and ref have identical losses: the same code ran")
    if not all(impl.startswith("ref") for impl in ref["kernels"].values()):
        raise AssertionError(f"the ref run does not use the references: {ref['kernels']}")
    on_ref = [op for op, impl in other["kernels"].items() if impl == "ref"]
    on_ref += [op for op, impl in other.get("kernels_logged", {}).items() if impl.startswith("ref")]
    if on_ref:
        raise AssertionError(
            f"{label} runs the references for {sorted(set(on_ref))}: {other['kernels']} "
            f"(logged: {other.get('kernels_logged')})"
        )
    tol = TOL[precision]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    k = max(1, len(a) // 10)
    final_a, final_b = statistics.fmean(a[-k:]), statistics.fmean(b[-k:])
    res = {
        "precision": precision,
        "tolerance": tol,
        "steps": len(a),
        "losses_side_by_side": [[i + 1, x, y] for i, (x, y) in enumerate(zip(a, b))],
        "first_step_rel_diff": round(diffs[0] / abs(a[0]), 7),
        "max_abs_loss_diff": round(max(diffs), 6),
        f"final_loss_ref_last{k}": round(final_a, 4),
        f"final_loss_{label}_last{k}": round(final_b, 4),
        "images_per_s": {"ref": ref["images_per_s"], label: other["images_per_s"]},
        "tokens_per_s": {"ref": ref["tokens_per_s"], label: other["tokens_per_s"]},
        f"speedup_{label}_over_ref": round(other["images_per_s"] / ref["images_per_s"], 3),
        "model_tflops": {"ref": ref["model_tflops"], label: other["model_tflops"]},
        "mfu": {"ref": ref["mfu"], label: other["mfu"]},
        "peak_mib": {"ref": ref["peak_mib"], label: other["peak_mib"]},
    }
    if res["first_step_rel_diff"] > tol["first_rel"]:
        raise AssertionError(f"step 1 differs by {res['first_step_rel_diff']:.2e} relative: {res}")
    if "max_abs" in tol and res["max_abs_loss_diff"] > tol["max_abs"]:
        raise AssertionError(f"the losses differ by {res['max_abs_loss_diff']:.2e}: {res}")
    if "final_abs" in tol and abs(final_a - final_b) > tol["final_abs"]:
        raise AssertionError(f"the final losses differ by {abs(final_a - final_b):.3f}: {res}")
    mfu = lambda r: "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.2f}%"
    res["summary"] = (
        f"loss ref {a[0]:.3f}->{final_a:.3f} {label} {b[0]:.3f}->{final_b:.3f} "
        f"(max |d| {res['max_abs_loss_diff']:.1e}); img/s {ref['images_per_s']:.0f} / "
        f"{other['images_per_s']:.0f}{mfu(other)}"
    )
    return res


def run(rep: Report, a) -> None:
    import torch

    for mod in ("torchvision", "numpy", "PIL", "tokenizers"):
        if importlib.util.find_spec(mod) is None:
            raise Skip(f"{mod} is not installed (fastcap-train needs it)")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    size = DRY if not cuda else GPU
    if cuda and a.quick:
        size = dataclasses.replace(size, steps=20, warmup=5, skip=5)
    precision = train_precision(dev)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-train-"))
    rep.set(work=str(work), precision=precision, size=dataclasses.asdict(size))

    target = work / "site"
    wheels = Path(a.wheels)
    if any(wheels.glob("*.whl")):  # offline: every requirement met by a wheel or the machine
        rep.item("train/wheels", lambda: _summarised(check_resolves(wheels, wheels_python(wheels))))
    inst = rep.item("train/deepspeed", lambda: _deepspeed(wheels, target))
    if inst["status"] == "skipped":
        raise Skip(inst["reason"])
    if inst["status"] == "failed":
        return
    path = [str(package_root(work / "pkg"))] + [str(target)] * bool(inst["installed"])
    path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), WANDB_MODE="disabled")
    data = work / "shapes"
    if rep.item("train/data", lambda: _data(data, size))["status"] != "ok":
        return

    label, spec = _kernels_spec(cuda, dev)
    config = zero3_config(work)
    runs = {}
    for name, kernels in (("ref", "ref"), (label, spec)):
        cmd = train_command(data, work / "runs" / name, size, precision, config)

        def one(cmd=cmd, kernels=kernels, name=name):
            left = None if a.deadline is None else max(5.0, a.deadline - time.time() - 3)
            res = {"command": " ".join(cmd[1:]), "FASTCAP_KERNELS": kernels}
            res["kernels"] = _resolved(kernels, dev)
            env["FASTCAP_KERNELS"] = kernels
            return res | _train(cmd, work / "runs" / name, env, left, size, cuda, precision)

        runs[name] = rep.item(f"train/{name}", one)

    def gate():
        r, u = runs["ref"], runs[label]
        if r["status"] != "ok" or u["status"] != "ok":
            raise Skip("a training run failed; nothing to compare")
        res = compare(r, u, label, precision)
        if not cuda:
            res["note"] = "CPU: fp32, Triton kernels in the interpreter against the references"
        measured = _measured_matmul_tflops(Path(a.out))
        if measured and cuda:  # the env stage's bf16 matmul: the ceiling reached here
            res["matmul_tflops_measured"] = measured
            res["share_of_measured_matmul"] = {
                k: round(v / measured, 5) for k, v in res["model_tflops"].items()
            }
        return res

    cmp_ = rep.item("train/compare", gate)
    if cmp_["status"] == "ok":
        shutil.rmtree(work, ignore_errors=True)  # kept for a look when something failed
