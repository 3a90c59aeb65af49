"""bench/gpu_check: the dry run walks every stage through its real code (kernels in the
interpreter against the references, the train stage through fastcap-train), a stage that
overruns its limit is killed and recorded, the correctness rule catches wrong outputs and wrong
gradients, the train stage's gate catches diverging, broken or identical runs, the wheels of
`make gpu-wheels` install into a --target folder, the checkout runs as an installed package
from a subprocess, and the analytic FLOP counts of bench/flops.py agree with PyTorch's FLOP
counter."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import flops  # noqa: E402
from gpu_check import STAGES, harness, runner, stage_correct, stage_train, wheels  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.mark.slow
def test_dry_run_walks_every_stage(tmp_path):
    out = tmp_path / "gc"
    env = dict(os.environ, FASTCAP_KERNELS="auto")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == list(STAGES)
    for stage, res in summary["stages"].items():
        assert (out / f"{stage}.json").is_file()
        assert res["status"] == "ok", (stage, res.get("error"), res.get("reason"))
    items = {i["name"]: i for s in summary["stages"].values() for i in s["items"]}
    # nothing skipped but what cannot run here, each with its reason: on a CPU the bf16 checks
    skipped = {n for n, i in items.items() if i["status"] != "ok"}
    assert all(items[n]["status"] == "skipped" and items[n]["reason"] for n in skipped)
    assert skipped == (set() if CUDA else {n for n in items if n.endswith("/bfloat16")})
    # the extension was built (or loaded) and aligns exactly as PyTorch does
    assert items["build"]["status"] == "ok"
    assert [n for n, i in items.items() if n.startswith("align_") and i["identical"]]
    # every kernel was checked in fp32 and fp16 (the interpreter's on a CPU)
    for kernel in ("attention/", "moe/triton/", "moe/triton+ext_align/", "siglip/triton/"):
        for dt in ("float32", "float16"):
            assert [n for n in items if n.startswith(kernel) and n.endswith("/" + dt)], kernel
    # every op was timed with every implementation
    timed = {tuple(n.split("/")[::3]) for n, i in items.items() if "ms" in i and n.count("/") == 3}
    want = {("attention", i) for i in ("triton", "ref", "sdpa+rope")}
    want |= {("moe", i) for i in ("triton", "triton+ext_align", "grouped_mm", "ref")}
    want |= {("siglip", i) for i in ("triton", "chunked", "naive")}
    assert want <= timed, want - timed
    # the training runs are fastcap-train under ZeRO-3, and compare the references with the
    # kernels, not ref with itself
    assert items["train/deepspeed"]["status"] == "ok"
    label = "auto" if CUDA else "triton"
    ref_run, kern_run = items["train/ref"], items[f"train/{label}"]
    for r in (ref_run, kern_run):
        assert r["command"].startswith("-m fastcap.cli.train "), r["command"]
        assert "| ZeRO-3 |" in r["model_line"], r["model_line"]
        assert r["model_line"].endswith(f"kernels: {r['FASTCAP_KERNELS']}"), r["model_line"]
    assert set(ref_run["kernels"].values()) == {"ref"}
    for op in ("attention", "moe", "siglip"):
        assert kern_run["kernels"][op] != "ref", (op, kern_run["kernels"])
    cmp_ = items["train/compare"]
    assert cmp_["status"] == "ok"
    size = stage_train.GPU if CUDA else stage_train.DRY
    assert len(cmp_["losses_side_by_side"]) == size.steps
    if not CUDA:
        assert cmp_["max_abs_loss_diff"] <= stage_train.TOL["fp32"]["max_abs"]
    table = proc.stdout[proc.stdout.rindex("stage    status") :]  # the short table comes last
    assert all(stage in table for stage in STAGES)
    # the plan comes first: each stage's expected time and limit, in the 9-minute budget
    head = proc.stdout[: proc.stdout.index("=== env")]
    assert f"in a {runner.DRY_TOTAL_S} s budget" in head
    assert all(f"  {stage:8} expected ~" in head for stage in STAGES)
    assert (out / "table.txt").read_text().startswith("stage    status")


def test_budget_fits_the_device_tools_command_limit():
    """9 minutes for the stages, inside the device tool's 10 minutes a command."""
    assert runner.TOTAL_S <= 540 and runner.DRY_TOTAL_S <= 540
    assert set(runner.ESTIMATE_S) == set(runner.DRY_ESTIMATE_S) == set(STAGES)
    assert sum(runner.ESTIMATE_S.values()) <= runner.TOTAL_S


def test_a_cut_off_run_leaves_its_table(tmp_path, monkeypatch):
    """summary.json and table.txt are written as each stage ends, so a run the machine cuts
    off still returns the table of what finished."""
    seen = []

    def fake_stage(a, stage, limit):
        if stage == "correct":  # the machine's own limit strikes here
            seen.append((tmp_path / "table.txt").read_text())
            raise KeyboardInterrupt
        return {"stage": stage, "status": "ok", "items": [], "seconds": 1.0}

    monkeypatch.setattr(runner, "_run_stage", fake_stage)
    with pytest.raises(KeyboardInterrupt):
        runner.main(["--dry-run", "--out", str(tmp_path)])
    assert "env" in seen[0] and "ext" in seen[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["stages"]) == ["env", "ext"]


def test_stage_over_its_limit_is_killed_and_recorded(tmp_path):
    a = argparse.Namespace(out=str(tmp_path), dry_run=True, quick=False)
    res = runner._run_stage(a, "train", limit=0.5)
    assert res["status"] == "timeout" and "limit" in res["reason"]
    assert json.loads((tmp_path / "train.json").read_text())["status"] == "timeout"


# ----------------------------------------------------------------------------- the train stage


def _run(losses, kernels="triton", logged=None):
    return {
        "losses": losses,
        "kernels": dict.fromkeys(("attention", "moe", "siglip", "lce"), kernels),
        "kernels_logged": logged or {},
        "images_per_s": 100.0,
        "tokens_per_s": 1900.0,
        "model_tflops": 0.01,
        "mfu": None,
        "peak_mib": None,
    }


_FALLING = [5.8, 5.1, 4.6, 4.2, 3.9, 3.7, 3.5, 3.4, 3.3, 3.2]


@pytest.mark.parametrize(
    "fault,precision,match",
    [
        (None, "fp32", None),
        (None, "bf16", None),
        ("nan", "bf16", "non-finite"),
        ("flat", "bf16", "did not fall"),
        ("identical", "fp32", "identical"),
        ("on_ref", "bf16", "runs the references"),
        ("fell_back", "bf16", "runs the references"),
        ("first_step", "bf16", "step 1 differs"),
        ("drift_fp32", "fp32", "differ by"),
        ("final_bf16", "bf16", "final losses differ"),
    ],
)
def test_train_gate(fault, precision, match):
    """compare() passes two close falling curves of different implementations and fails each
    way a kernels run can be wrong: NaN, no learning, the same code (identical losses), the
    references selected or logged as a fallback, a different first step, drifting apart (fp32:
    at any step; bf16: at the end)."""
    ref = _run(list(_FALLING), kernels="ref")
    rel = 1e-7 if precision == "fp32" else 5e-3  # rounding-sized differences of each dtype
    other = _run([x * (1 + rel * (-1) ** i) for i, x in enumerate(_FALLING)])
    if fault == "nan":
        other["losses"][4] = float("nan")
    elif fault == "flat":
        other["losses"] = [5.8] * 9 + [5.9]
    elif fault == "identical":
        other["losses"] = list(ref["losses"])
    elif fault == "on_ref":
        other["kernels"]["attention"] = "ref"
    elif fault == "fell_back":
        other["kernels_logged"] = {"moe": "ref (fell back)"}
    elif fault == "first_step":
        other["losses"][0] *= 1.03
    elif fault == "drift_fp32":
        other["losses"][5] += 2e-3
    elif fault == "final_bf16":
        other["losses"][-1] += 0.3
    if match is None:
        res = stage_train.compare(ref, other, "auto", precision)
        assert len(res["losses_side_by_side"]) == len(_FALLING)
        assert res["max_abs_loss_diff"] > 0
    else:
        with pytest.raises(AssertionError, match=match):
            stage_train.compare(ref, other, "auto", precision)


def test_gpu_train_command_is_a_valid_zero3_bf16_run(tmp_path):
    """The GPU run's command line (never run here) parses into the config the stage means:
    bf16, ZeRO-3, routed experts, head dim 64, no evaluation, no W&B."""
    from fastcap.cli.train import parser
    from fastcap.train import engine
    from fastcap.train.config import build

    size = stage_train.GPU
    config = stage_train.zero3_config(tmp_path)
    cmd = stage_train.train_command(tmp_path / "d", tmp_path / "r", size, "bf16", config)
    assert cmd[:3] == [sys.executable, "-m", "fastcap.cli.train"]
    args = parser().parse_intermixed_args(cmd[3:])
    flags = ["wandb=disabled", f"max_steps={args.steps}", f"batch_size={args.batch_size}"]
    cfg = build(args.preset, args.config, flags + args.overrides)
    assert (cfg.precision, cfg.wandb, cfg.max_steps) == ("bf16", "disabled", size.steps)
    assert engine.deepspeed_config(cfg, 1, "bf16")["zero_optimization"]["stage"] == 3
    assert cfg.model.moe.enabled and cfg.model.head_dim == 64
    assert cfg.data.eval_splits == [] and cfg.eval_every > size.steps
    assert cfg.batch_size == size.batch and cfg.log_every == 1


def test_deepspeed_missing_without_wheels_skips_with_the_fix(tmp_path, monkeypatch):
    real = stage_train.importlib.util.find_spec
    monkeypatch.setattr(
        stage_train.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real(name, *a),
    )
    with pytest.raises(harness.Skip, match="make gpu-wheels"):
        stage_train._deepspeed(tmp_path / "none", tmp_path / "site")


def test_package_root_imports_the_checkout_as_installed(tmp_path):
    """What the train stage puts on fastcap-train's PYTHONPATH: fastcap from the checkout, with
    kernels/ as fastcap.kernels and csrc/ found by the extension loader, as pyproject.toml's
    package-dir maps them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((harness.REPO / "pyproject.toml").read_text())
    mapped = pyproject["tool"]["setuptools"]["package-dir"]
    dirs = harness.PACKAGE_DIRS.items()
    assert mapped == {f"fastcap.{k}": str(p.relative_to(harness.REPO)) for k, p in dirs}
    root = harness.package_root(tmp_path / "pkg")
    code = (
        "import fastcap, fastcap.kernels.siglip as k, fastcap.common.moe_align as m;"
        "print(fastcap.__file__); print(k.__file__); print(m.csrc_dir())"
    )
    env = dict(os.environ, PYTHONPATH=str(root))
    run = dict(capture_output=True, text=True, env=env, check=True, cwd=tmp_path)
    out = subprocess.run([sys.executable, "-c", code], **run).stdout.split()
    assert out[0] == str(root / "fastcap" / "__init__.py")  # not the editable install's
    assert Path(out[1]).resolve() == harness.REPO / "kernels" / "siglip.py"
    assert Path(out[2]) == harness.REPO / "csrc"


def _tiny_wheel(src: Path, out: Path, version: str) -> Path:
    """A wheel of a one-module package built by pip, as `make gpu-wheels` builds DeepSpeed."""
    (src / "gpucheck_probe").mkdir(parents=True)
    (src / "gpucheck_probe" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "gpucheck-probe"\nversion = "{version}"\n'
    )
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "--no-index", "-w", str(out), str(src)], check=True)
    return next(out.glob("gpucheck_probe-*.whl"))


@pytest.mark.slow
def test_wheels_install_into_a_target_folder(tmp_path):
    """No network: a folder of wheels installs into a --target folder that a subprocess then
    imports from; wheels of distributions already installed at that version or newer are left
    out, older ones are installed."""
    folder = tmp_path / "wheels"
    whl = _tiny_wheel(tmp_path / "src", folder, "1.2.3")
    assert wheels.wheel_name_version(whl) == ("gpucheck-probe", "1.2.3")
    todo, present = wheels.plan(folder)
    assert todo == [whl] and present == {}
    target = tmp_path / "site"
    res = wheels.install(folder, target)
    assert res["installed"] == ["gpucheck-probe==1.2.3"]
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = "import gpucheck_probe as p; print(p.VERSION, p.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert out[0] == "1.2.3" and out[1].startswith(str(target))
    # pytest is installed here: its own version is left out, a newer wheel is not
    have = importlib.metadata.version("pytest")
    (folder / f"pytest-{have}-py3-none-any.whl").touch()
    (folder / "pytest-999.0-py3-none-any.whl").touch()
    todo, present = wheels.plan(folder)
    assert present == {"pytest": have}
    assert {w.name for w in todo} == {whl.name, "pytest-999.0-py3-none-any.whl"}
    cmd = wheels.install_command(todo, target)
    assert {"--no-index", "--no-deps", "--target"} <= set(cmd) and cmd[-len(todo) :] == [
        str(w) for w in todo
    ]


def test_wheel_check_resolves_offline_and_catches_what_is_missing(tmp_path):
    """check_resolves: the pins' whole requirement tree met by the wheels plus the machine's
    own packages, for the target Python, offline; a missing wheel, a wheel for another Python
    and a machine version that conflicts each fail with pip's reason."""
    folder = tmp_path / "w"
    wheels.stub_wheel(folder, "probe-a", "1.0", requires=("probe-b>=2", "torch>=2.0"))
    wheels.stub_wheel(folder, "probe-b", "2.1", tag="cp312-cp312-manylinux2014_x86_64")
    pins = ("probe-a==1.0",)
    res = wheels.check_resolves(folder, "3.12", {"torch": "2.11.0"}, pins)
    assert res["resolved"] == {"probe-a": "1.0", "probe-b": "2.1", "torch": "2.11.0"}
    assert res["from_machine"] == ["torch"]
    with pytest.raises(RuntimeError, match="probe-b"):  # the compiled wheel is for 3.12 only
        wheels.check_resolves(folder, "3.11", {"torch": "2.11.0"}, pins)
    with pytest.raises(RuntimeError, match="torch"):  # the machine's torch is too old
        wheels.check_resolves(folder, "3.12", {"torch": "1.13.0"}, pins)
    (folder / "probe_b-2.1-cp312-cp312-manylinux2014_x86_64.whl").unlink()
    with pytest.raises(RuntimeError, match="probe-b"):
        wheels.check_resolves(folder, "3.12", {"torch": "2.11.0"}, pins)


@pytest.mark.slow
def test_gpu_wheels_resolve_for_python_312(tmp_path):
    """The wheel set of `make gpu-wheels` (.gpu-wheels, else built here from PyPI) resolves
    for the GPU machine's Python 3.12 with no index: DeepSpeed and everything it imports, from
    the wheels or from what the machine has (torch 2.11, numpy, tqdm)."""
    folder = wheels.DEFAULT_DIR
    if not any(folder.glob("*.whl")):
        folder = tmp_path / "gpu-wheels"
        wheels.build(folder, "3.12")
    res = wheels.check_resolves(folder, "3.12")
    pinned = {wheels._norm(p.split("==")[0]): p.split("==")[1] for p in wheels.PINS}
    assert {n: res["resolved"][n] for n in pinned} == pinned
    assert set(res["from_machine"]) == {"torch", "numpy", "tqdm"}
    assert res["resolved"]["torch"] == wheels.MACHINE["torch"]


def test_gpu_wheels_pins_one_version_of_each():
    names = [wheels._norm(p.split("==")[0]) for p in wheels.PINS]
    assert all("==" in p for p in wheels.PINS)
    assert len(names) == len(set(names)) and {"deepspeed", "pydantic-core"} <= set(names)


def test_bf16_peak_lookup():
    assert flops.bf16_peak_tflops("NVIDIA H200") == 989.5
    assert flops.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.bf16_peak_tflops("Some Future GPU") is None


# ----------------------------------------------------------------------------- FLOP counts


def _counted(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "trunk,size,stride,patch,L",
    [("resnet18", 64, 8, 1, 13), ("resnet34", 80, 16, 1, 7), ("resnet50", 96, 16, 3, 1 + 4)],
)
def test_model_flops_match_flop_counter(monkeypatch, trunk, size, stride, patch, L):
    """The analytic count against torch's FlopCounterMode on one forward of a dense model
    (the MoE reference pads experts to equal rows, so its counted FLOPs exceed the useful ones;
    the routed term is checked by test_moe_flops_match_flop_counter)."""
    from fastcap.model import Captioner, ModelConfig

    monkeypatch.setenv("FASTCAP_KERNELS", "ref")
    cfg = ModelConfig(
        trunk=trunk,
        image_size=size,
        trunk_stride=stride,
        patch=patch,
        width=64,
        heads=4,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=2,
        vocab_size=37,
        embed_dim=32,
        max_len=L,
    )
    model = Captioner(cfg)
    B = 3
    images = torch.randn(B, 3, size, size)
    tokens = torch.randint(3, 37, (B, L))
    counted = _counted(model, images, tokens, torch.full((B,), L))
    # FlopCounterMode counts no FLOPs for scaled_dot_product_attention on the CPU (its CPU
    # kernels have no formula), so the attention score/value products leave the comparison
    N, d = (size // stride // patch) ** 2, cfg.width
    scores = cfg.encoder_layers * 4 * N * N * d + 3 * 4 * L * L * d + 2 * 4 * L * N * d
    want = flops.model_flops_per_image(cfg, L) / 3 * B - scores * B
    # the rest differs by the SigLIP B x B logits only (2 B^2 e FLOPs, left out on purpose);
    # exact: the trunk is most of the count, so a tolerance would hide a wrong decoder term
    assert want + 2 * B * B * cfg.embed_dim == pytest.approx(counted, rel=1e-12), (want, counted)


def test_attention_flops_match_flop_counter():
    """Forward of a plain (matmul) attention; the backward's 2.5x is flash-attention's count
    (the scores recomputed), which a plain autograd backward does not do."""
    B, H, Lq, Lk, D = 2, 3, 7, 11, 16
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    counted = _counted(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert flops.attention_flops(B, H, Lq, Lk, D) == counted
    assert flops.attention_flops(B, H, Lq, Lk, D, causal=True) == counted / 2
    assert flops.attention_flops(B, H, Lq, Lk, D, backward=True) == 3.5 * counted


@pytest.mark.parametrize("backward", [False, True])
def test_moe_flops_match_flop_counter(backward):
    """The routed experts as one gather and two matmuls per expert (no padding), forward and
    forward + backward: 6 T k d f and 3x that."""
    T, d, f, E, k = 37, 16, 8, 5, 2
    x = torch.randn(T, d, requires_grad=True)
    w13 = torch.randn(E, d, 2 * f, requires_grad=True)
    w2 = torch.randn(E, f, d, requires_grad=True)
    ids = torch.randn(T, E).topk(k, dim=-1).indices

    def moe():
        out = torch.zeros_like(x)
        for e in range(E):
            tok = (ids == e).nonzero()[:, 0]
            h = x[tok] @ w13[e]
            out = out.index_add(0, tok, (F.silu(h[:, :f]) * h[:, f:]) @ w2[e])
        if backward:
            torch.autograd.grad(out.sum(), (x, w13, w2))

    assert flops.moe_flops(T, d, f, k, backward=backward) == _counted(moe)


def test_siglip_flops_match_flop_counter():
    """The reference SigLIP loss, forward + backward: the logits, d img and d txt."""
    from fastcap.ops.ref.siglip import siglip_loss

    B, D = 13, 8
    img, txt = (torch.randn(B, D, requires_grad=True) for _ in "it")
    ls, lb = torch.tensor(2.3, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    counted = _counted(lambda: torch.autograd.grad(siglip_loss(img, txt, ls, lb), (img, txt)))
    assert flops.siglip_flops(B, D) == counted


# ----------------------------------------------------------------------------- correctness rule

SIGLIP_OUTS = ["loss", "dimg", "dtxt", "dscale", "dbias"]


def _make_siglip(dtype):
    img, txt = (F.normalize(torch.randn(33, 16), dim=-1) for _ in "it")
    ls, lb = torch.tensor(2.3), torch.tensor(-10.0)
    return tuple(t.to(dtype).requires_grad_() for t in (img, txt, ls, lb)), [0, 1, 2, 3]


class _WrongImgGrad(torch.autograd.Function):
    """Identity forward; the gradient 1% too large: right loss, wrong d img."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_compare_passes_another_implementation(impl):
    """The rule passes an implementation other than the reference: the chunked reference, and
    the Triton kernel (the interpreter on a CPU), in fp32."""
    from fastcap.ops.ref.siglip import siglip_loss, siglip_loss_chunked

    if impl == "triton":
        if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not set")
        from fastcap.kernels.siglip import siglip_loss as fn
    else:
        fn = lambda *a: siglip_loss_chunked(*a, chunk=8)  # 33 rows: 4 full chunks and 1 row
    res = stage_correct.compare(fn, siglip_loss, _make_siglip, torch.float32, SIGLIP_OUTS)
    assert res["summary"] == "pass"
    assert all(float(res[n]["err"]) <= float(res[n]["bound"]) for n in SIGLIP_OUTS)


@pytest.mark.parametrize("fault", ["scaled", "nan", "grad"])
def test_compare_catches_a_wrong_kernel(fault):
    """The rule fails a kernel 1% off, one leaving a NaN, or one right in the forward but 1%
    off in one gradient."""
    from fastcap.ops.ref.siglip import siglip_loss

    def wrong(img, txt, ls, lb):
        if fault == "grad":
            return siglip_loss(_WrongImgGrad.apply(img), txt, ls, lb)
        loss = siglip_loss(img, txt, ls, lb)
        return loss * 1.01 if fault == "scaled" else loss + img[0, 0] * float("nan")

    match = {"scaled": "FAIL: loss", "nan": "nonfinite", "grad": "FAIL: dimg"}[fault]
    with pytest.raises(AssertionError, match=match):
        stage_correct.compare(wrong, siglip_loss, _make_siglip, torch.float32, SIGLIP_OUTS)


@pytest.mark.parametrize("gpu,want", [("t4", "fp16"), ("a100", "bf16"), ("h100", "bf16")])
def test_train_stage_trains_in_the_policy_precision(gpu, want):
    """The train stage passes the capability policy's precision and checks the model line for
    it: it used to pass bf16 on any GPU, a T4 included (emulated bf16, no Triton bf16 on sm_75)."""
    from fastcap.common import capability

    with capability.simulate(gpu):
        got = stage_train.train_precision(torch.device("cuda"))
    assert got == want
    assert stage_train.TOL[got]
