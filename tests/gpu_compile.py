"""Compile every Triton kernel for sm_75, sm_80, sm_86, sm_89 and sm_90 without a GPU, and read
its resources and instruction mix.

    python tests/gpu_compile.py                  # the table; exit status 1 on any failure
    python tests/gpu_compile.py --module moe     # one kernel module
    python tests/gpu_compile.py --json rows.json # also the rows (tests/test_gpu_compile.py)

Each public module of ``fastcap.kernels`` (``kernels/<op>.py``) exposes
``compile_targets(arch, dtype)``, a generator of dicts, one per (kernel, config) that its
launchers can run on that architecture in that dtype:

* ``kernel``  the ``@triton.jit`` function, or the autotuner wrapping it;
* ``name``    ``<module>.<kernel>`` for the table (``attention.fwd``);
* ``config``  a short label of the tile and the shape (``D128 64x64 w4 s3``);
* ``args``, ``kwargs``  the call exactly as the launcher makes it, tensors on the ``meta``
  device, plus the autotuned meta-parameters and ``num_warps`` / ``num_stages``;
* ``shared_estimate`` (optional)  the bytes of shared memory the launcher's pruning assumes the
  config needs; a row fails if the compiled kernel needs more (the pruning would then keep a
  tile that does not fit).

Architectures: sm_75 (T4: fp16 only, no bf16 there; 64 KB of shared memory a block), sm_80
(A100: 163 KB), sm_86 and sm_89 (A10 / RTX 3090, L4 / RTX 4090: 99 KB), sm_90 (H100 / H200:
227 KB); the limits are :data:`fastcap.common.capability.OPTIN_SHARED`, and the kernels'
``compile_targets`` prune with the same limit their launchers read from the device.

The same config lists and pruning functions choose the tiles there and at run time, so what is
compiled here is what the autotuner may pick. Arguments are specialised as Triton's launcher
specialises them (``specialize_impl`` in triton/runtime/jit.py): pointers as 16-byte aligned
(the caching allocator aligns every block to 512 bytes), integers equal to 1 as constants,
integers divisible by 16 as such. That matters: without those hints Triton cannot use
asynchronous copies, keeps the next tiles in registers and spills where the real launch does
not (``--unaligned`` drops the integer hints, as a model width that is no multiple of 16 would).

Each distinct compile runs once (``--jobs`` spawned processes, TRITON_INTERPRET unset, Triton's
cache in a fresh temporary folder, so nothing is reused across runs), then ``cuobjdump
--dump-resource-usage`` (shipped with Triton) reads the cubin, and ``cuobjdump --dump-sass``
gives its instruction mix: tensor-core instructions (HGMMA: sm_90 warpgroup MMA; HMMA:
mma.sync), asynchronous copies (LDGSTS: cp.async; TMA: UTMALDG / UBLKCP), and FFMA.

A row fails when ptxas spilled (a stack frame or local memory) or when the shared memory
(static plus Triton's dynamic allocation) is above the architecture's opt-in limit per block,
or above the pruning's own estimate for that config. A module without
``compile_targets`` fails too: a new kernel file is picked up without editing this one, and
cannot be forgotten.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastcap.common.capability import OPTIN_SHARED  # noqa: E402 - the policy's table

ARCHS = (75, 80, 86, 89, 90)
DTYPES = ("fp16", "bf16")
# bf16 needs sm_80 (PTX rejects it below); the capability policy gives a T4 fp16
ARCH_DTYPES = {75: ("fp16",)}
# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), from the one table
# the launchers' fallback also reads: A100 164 KB minus the 1 KB the driver reserves, ...
SHARED_LIMIT = {a: OPTIN_SHARED[(a // 10, a % 10)] for a in ARCHS}
# SASS opcode families counted per cubin (the opcode's first dot-separated word)
MIX = {
    "hgmma": ("HGMMA",),
    "hmma": ("HMMA",),
    "ldgsts": ("LDGSTS",),
    "tma": ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF"),
    "ffma": ("FFMA",),
}
_TORCH_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_PTR = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32", "int64": "i64"}
_FIELDS = ("REG", "STACK", "SHARED", "LOCAL")
_DIVISIBLE = [["tt.divisibility", 16]]


def kernel_modules() -> list[str]:
    """Public modules of fastcap.kernels (names not starting with an underscore)."""
    import fastcap.kernels as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _jit(kernel):
    """The JITFunction under any autotuner / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _job(target: dict, arch: int, unaligned: bool = False) -> dict:
    """A picklable compile job: the signature, constants and attributes Triton's launcher would
    derive from this call."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = _jit(target["kernel"])
    kwargs = dict(target["kwargs"])
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    bound = inspect.signature(fn.fn).bind(*target["args"], **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (name, value)) in enumerate(zip(fn.params, bound.arguments.items())):
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _PTR[str(value.dtype).removeprefix("torch.")]
            attrs[(i,)] = _DIVISIBLE
        else:
            spec = not param.do_not_specialize
            ty, attr = native_specialize_impl(BaseBackend, value, False, spec, True)
            if ty == "constexpr":
                signature[name], constexprs[name] = "constexpr", value
            else:
                signature[name] = ty
                if attr == "D" and not unaligned:
                    attrs[(i,)] = _DIVISIBLE
    key = (fn.fn.__module__, fn.__name__, signature, constexprs, attrs, options, arch)
    return {
        "module": fn.fn.__module__,
        "fn": fn.__name__,
        "signature": signature,
        "constexprs": constexprs,
        "attrs": attrs,
        "options": options,
        "arch": arch,
        "key": repr(key),
    }


def enumerate_jobs(archs=ARCHS, dtypes=DTYPES, modules=None, unaligned=False):
    """(rows, jobs): one row per (target, arch, dtype), one job per distinct compile."""
    import torch

    rows, jobs = [], {}
    for mod_name in modules or kernel_modules():
        mod = importlib.import_module(f"fastcap.kernels.{mod_name}")
        targets = getattr(mod, "compile_targets", None)
        if targets is None:
            error = f"kernels/{mod_name}.py has no compile_targets(arch, dtype)"
            rows.append({"name": mod_name, "config": "-", "arch": 0, "dtype": "-", "key": None,
                         "error": error})  # fmt: skip
            continue
        for arch in archs:
            for dt in dtypes:
                if dt not in ARCH_DTYPES.get(arch, DTYPES):
                    continue
                for t in targets(arch, getattr(torch, _TORCH_DTYPE[dt])):
                    job = _job(t, arch, unaligned)
                    jobs.setdefault(job["key"], job)
                    rows.append({"name": t["name"], "config": t["config"], "arch": arch,
                                 "dtype": dt, "key": job["key"],
                                 "estimate": t.get("shared_estimate")})  # fmt: skip
    return rows, list(jobs.values())


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def parse_resource_usage(text: str) -> dict[str, int]:
    """REG, STACK, SHARED (static) and LOCAL of the one function in cuobjdump's report."""
    out = {}
    for line in text.splitlines():
        if line.strip().startswith("REG:"):
            for field in line.split():
                name, _, value = field.partition(":")
                if name in _FIELDS:
                    out[name] = int(value)
    if set(out) != set(_FIELDS):
        raise ValueError(f"cannot read cuobjdump's resource usage from:\n{text}")
    return out


def parse_sass_mix(text: str) -> dict[str, int]:
    """Counts of the :data:`MIX` families in ``cuobjdump --dump-sass`` output."""
    family = {op: fam for fam, ops in MIX.items() for op in ops}
    out = dict.fromkeys(MIX, 0)
    for line in text.splitlines():
        # "        /*0450*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;"
        if "*/" not in line or not line.lstrip().startswith("/*"):
            continue
        words = line.split("*/", 1)[1].split()
        if words and words[0].startswith("@"):
            words = words[1:]
        if words:
            fam = family.get(words[0].split(".")[0])
            if fam:
                out[fam] += 1
    return out


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before the worker imports triton
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_job(job: dict) -> dict:
    """Compile one job (in a worker) and read the cubin's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        fn = _jit(getattr(importlib.import_module(job["module"]), job["fn"]))
        src = ASTSource(fn, job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            cmd = [_cuobjdump(), "--dump-resource-usage", f.name]
            use = parse_resource_usage(subprocess.run(cmd, capture_output=True, text=True).stdout)
            cmd = [_cuobjdump(), "--dump-sass", f.name]
            sass = subprocess.run(cmd, capture_output=True, text=True).stdout
            mix = parse_sass_mix(sass)
            if not any(ln.lstrip().startswith("/*") for ln in sass.splitlines()):
                raise RuntimeError("cuobjdump --dump-sass printed no instruction")
        res = {"regs": use["REG"], "stack": use["STACK"], "local": use["LOCAL"],
               "shared": use["SHARED"] + k.metadata.shared, "error": None, **mix}  # fmt: skip
    except Exception as e:  # a failed compile is a failed row, not a crashed run
        res = {"regs": 0, "stack": 0, "local": 0, "shared": 0, "error": f"{type(e).__name__}: {e}",
               **dict.fromkeys(MIX, 0)}  # fmt: skip
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def problems(row: dict) -> list[str]:
    """Why a row fails: a compile error, a spill, or shared memory above the limit."""
    if row.get("error"):
        return [row["error"]]
    out = []
    if row["stack"] or row["local"]:
        out.append(f"spills: stack {row['stack']} B, local {row['local']} B")
    limit = SHARED_LIMIT[row["arch"]]
    if row["shared"] > limit:
        out.append(f"shared {row['shared']} B > sm_{row['arch']} limit {limit} B")
    est = row.get("estimate")
    if est is not None and row["shared"] > est:
        out.append(f"shared {row['shared']} B > the pruning's estimate {est} B")
    return out


def run(archs=ARCHS, dtypes=DTYPES, modules=None, jobs: int = 2, unaligned=False,
        cache: str | None = None) -> dict:  # fmt: skip
    """Enumerate, compile in ``jobs`` processes, and judge every row. ``cache``: a Triton cache
    folder to reuse (default a fresh temporary one, so that every compile really runs)."""
    t0 = time.perf_counter()
    rows, todo = enumerate_jobs(archs, dtypes, modules, unaligned)
    # The slowest first, so that the last compile does not run alone.
    todo.sort(key=lambda j: -j["options"]["num_warps"])
    with tempfile.TemporaryDirectory(prefix="fastcap-triton-cache-") as tmp:
        cache = cache or tmp
        pool = ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(cache,)
        )
        with pool:
            results = dict(zip((j["key"] for j in todo), pool.map(compile_job, todo)))
    for row in rows:
        key = row.pop("key")
        if key is None:
            row.update(regs=0, stack=0, local=0, shared=0, seconds=0.0, **dict.fromkeys(MIX, 0))
        else:
            row.update(results[key])
        row["problems"] = problems(row)
    return {"rows": rows, "compiles": len(todo), "seconds": round(time.perf_counter() - t0, 1)}


def format_table(report: dict) -> str:
    """One line per (kernel, config, arch, dtype), then one per (kernel, arch, dtype)."""
    rows = sorted(report["rows"], key=lambda r: (r["name"], r["arch"], r["dtype"], r["config"]))
    cols = (
        "{:<22} {:<40} {:>5} {:>5} {:>4} {:>7} {:>7} {:>5} {:>5}  {:>5} {:>5} {:>6} {:>3} {:>5}  {}"
    )
    lines = [cols.format("kernel", "config", "arch", "dtype", "regs", "shared", "est", "stack",
                         "local", "hgmma", "hmma", "ldgsts", "tma", "ffma", "status")]  # fmt: skip
    for r in rows:
        status = "; ".join(r["problems"]) or "ok"
        est = "-" if r.get("estimate") is None else r["estimate"]
        lines.append(cols.format(r["name"], r["config"], f"sm_{r['arch']}", r["dtype"], r["regs"],
                                 r["shared"], est, r["stack"], r["local"], r["hgmma"], r["hmma"],
                                 r["ldgsts"], r["tma"], r["ffma"], status))  # fmt: skip
    summary = "{:<22} {:>5} {:>5} {:>7} {:>8} {:>10} {:>6} {:>4}  {:>11} {:>10} {:>11} {:>8}"
    lines += ["", summary.format("kernel", "arch", "dtype", "configs", "max regs", "max shared",
                                 "spills", "over", "HGMMA cfgs", "HMMA cfgs", "LDGSTS cfgs",
                                 "TMA cfgs")]  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["arch"], r["dtype"]), []).append(r)
    for (name, arch, dt), rs in groups.items():
        spills = sum(bool(r["stack"] or r["local"]) for r in rs)
        over = sum(r["shared"] > SHARED_LIMIT.get(arch, 0) for r in rs)
        n = lambda f, rs=rs: f"{sum(r[f] > 0 for r in rs)}/{len(rs)}"  # noqa: E731
        lines.append(summary.format(name, f"sm_{arch}", dt, len(rs), max(r["regs"] for r in rs),
                                    max(r["shared"] for r in rs), spills, over, n("hgmma"),
                                    n("hmma"), n("ldgsts"), n("tma")))  # fmt: skip
    failing = sum(bool(r["problems"]) for r in rows)
    spilled = sum(bool(r["stack"] or r["local"]) for r in rows)
    over = sum(r["shared"] > SHARED_LIMIT.get(r["arch"], 0) for r in rows if r["arch"])
    archs = sorted({r["arch"] for r in rows if r["arch"]})
    lines.append(f"\narchitectures {', '.join(f'sm_{a}' for a in archs)}; {spilled} spilling, "
                 f"{over} over the shared-memory limit")  # fmt: skip
    lines.append(f"{len(rows)} rows, {report['compiles']} distinct compiles, {failing} failing, "
                 f"{report['seconds']:.0f} s")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=_TORCH_DTYPE)
    ap.add_argument("--module", nargs="+", help="kernel modules (default: every one)")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--unaligned", action="store_true", help="no divisibility hint on integers")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--cache", help="reuse this Triton cache folder (default: a fresh one)")
    args = ap.parse_args(argv)
    report = run(args.arch, args.dtype, args.module, args.jobs, args.unaligned, args.cache)
    print(format_table(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return int(any(r["problems"] for r in report["rows"]))


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before anything imports triton
    sys.exit(main())
