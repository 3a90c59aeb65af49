"""The packages the ``train`` stage needs beyond what a bare CUDA machine has, carried as wheels.

A lent GPU machine has torch, Triton, torchvision, tokenizers, numpy, Pillow, PyYAML and tqdm,
but no DeepSpeed and no package index. Here, where PyPI is reachable::

    make gpu-wheels        # = python bench/gpu_check/wheels.py --out .gpu-wheels

fills the git-ignored ``.gpu-wheels/`` with one wheel per name in :data:`PINS` for that machine's
Python (3.12, manylinux x86-64): DeepSpeed, an sdist, built here into a pure-Python wheel with
``DS_BUILD_OPS=0`` (no op is compiled ahead; ZeRO-3 with torch's AdamW needs none), and the
packages it imports, downloaded as binaries. The folder travels with the device tool's
``carry``. There, before the stage, :func:`install` puts into a ``--target`` folder each wheel
whose distribution is missing or older than the wheel (pydantic 2.14 needs a newer
typing-extensions than such an image may have), and the stage puts that folder on the
``PYTHONPATH`` of its ``fastcap-train`` runs.

The pins are the versions the test suite runs with in ``.venv``. W&B, pycocoevalcap and
webdataset are left out: the stage runs with ``--wandb disabled``, no evaluation splits and
shapes data. Standard library only: it runs on the bare machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / ".gpu-wheels"
BUILT = ("deepspeed==0.19.8",)
"""Built here with ``pip wheel`` (sdists on PyPI)."""
DOWNLOADED = (
    "hjson==3.1.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",  # compiled: the cp312 manylinux build
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",  # pydantic 2.14 requires >= 4.16
    # DeepSpeed's other needs: on the H200 image already (2026-11), carried in case they are not
    "py-cpuinfo==9.0.0",
    "msgpack==1.2.4",
    "psutil==7.2.2",
    "einops==0.8.2",
    "ninja==1.13.2",
    "packaging==26.4",
)
"""Downloaded as wheels for the target Python."""
PINS = BUILT + DOWNLOADED
MACHINE = {"torch": "2.11.0", "numpy": "2.5.2", "tqdm": "4.67.1"}
"""What the wheels need that the GPU machine has already (the device notes' pip list of the
H200 image, 2026-11: torch 2.11.0, numpy 2.5.2; tqdm is listed without its version, and
DeepSpeed asks for any). :func:`check_resolves` stands them in as metadata-only wheels."""
# pip matches manylinux_2_N exactly: name the ones these wheels are published under
PLATFORMS = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
MAX_MIB = 32  # the device tool carries 64 MiB in all, the working tree included


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return _norm(name), version


def _older(have: str, want: str) -> bool:
    """Is version ``have`` older than ``want``? (``packaging`` when there, else the numbers.)"""
    try:
        from packaging.version import Version

        return Version(have) < Version(want)
    except Exception:  # noqa: BLE001 - no packaging, or a version it cannot parse
        nums = lambda v: tuple(int(x) for x in re.findall(r"\d+", v))
        return nums(have) < nums(want)


def plan(wheels: Path) -> tuple[list[Path], dict[str, str]]:
    """(wheels to install, {name: version already installed} for those left out): a wheel is
    installed when its distribution is missing here or older than the wheel."""
    todo, present = [], {}
    for whl in sorted(wheels.glob("*.whl")):
        name, version = wheel_name_version(whl)
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            todo.append(whl)
            continue
        if _older(have, version):
            todo.append(whl)
        else:
            present[name] = have
    return todo, present


def install_command(wheels: list[Path], target: Path, python: str = sys.executable) -> list[str]:
    """The pip line that puts ``wheels`` into ``target``: no index (the machine reaches none),
    no dependency resolution (with ``--target`` pip would want torch itself: the folder is the
    list), no byte-compiling (imports compile what they use)."""
    return [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--target",
        str(target),
        *map(str, wheels),
    ]


def install(wheels: Path, target: Path) -> dict:
    """Install what :func:`plan` picks from ``wheels`` into ``target``; returns what was done.
    Raises RuntimeError with pip's message when pip fails."""
    todo, present = plan(wheels)
    res = {"wheels": str(wheels), "target": str(target), "already_installed": present}
    res["installed"] = [f"{n}=={v}" for n, v in map(wheel_name_version, todo)]
    if todo:
        cmd = install_command(todo, target)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip()[-1500:]
            raise RuntimeError(f"pip install --target failed ({proc.returncode}): {tail}")
        res["command"] = " ".join(cmd[:12]) + f" <{len(todo)} wheels>"
    return res


def stub_wheel(
    folder: Path, name: str, version: str, requires: tuple[str, ...] = (), tag: str = "py3-none-any"
) -> Path:
    """A wheel that holds only metadata (``name==version``, its ``requires``): what pip's
    resolver needs to count a package the target machine already has (and, in tests, a
    package of any shape)."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{_norm(name).replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{dist}.dist-info/METADATA": meta,
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: "
        f"true\nTag: {tag}\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(
        f"{n},,\n" for n in [*files, f"{dist}.dist-info/RECORD"]
    )
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


def resolve_command(
    wheels: Path,
    stubs: Path,
    python_version: str,
    report: Path,
    pins: tuple[str, ...] = PINS,
    python: str = sys.executable,
) -> list[str]:
    """``pip install --dry-run`` of every pin, with its dependencies, for CPython
    ``python_version`` on manylinux x86-64, from ``wheels`` and ``stubs`` alone (no index)."""
    plat = [f for p in PLATFORMS for f in ("--platform", f"{p}_x86_64")]
    return [
        python, "-m", "pip", "install", "--dry-run", "--ignore-installed",
        "--report", str(report), "--no-index",
        "--find-links", str(wheels), "--find-links", str(stubs),
        "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
        *plat, "--disable-pip-version-check", *pins,
    ]  # fmt: skip


def check_resolves(
    wheels: Path,
    python_version: str = "3.12",
    machine: dict | None = None,
    pins: tuple[str, ...] = PINS,
) -> dict:
    """Do the wheels in ``wheels``, with what the GPU machine has (``machine``, default
    :data:`MACHINE`), satisfy every requirement of every pin for that Python, offline? Returns
    ``{"resolved": {name: version}, "from_machine": [...]}``; RuntimeError with pip's message
    when they do not (a missing wheel, a version conflict, a wheel for another Python)."""
    import json
    import tempfile

    machine = MACHINE if machine is None else machine
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-stubs-") as tmp:
        stubs = Path(tmp)
        for name, version in machine.items():
            stub_wheel(stubs, name, version)
        report = stubs / "report.json"
        cmd = resolve_command(wheels, stubs, python_version, report, pins)
        env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_CONSTRAINT="")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            why = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
            why = [ln for ln in why if not ln.startswith(("Looking in", "WARNING: Location"))]
            tail = "\n".join(why)[-1500:]
            raise RuntimeError(f"the wheels do not resolve for Python {python_version}: {tail}")
        report = json.loads(report.read_text())
    got = {_norm(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    return {
        "python_version": python_version,
        "resolved": got,
        "from_machine": sorted(n for n in got if n in {_norm(m) for m in machine}),
    }


# ----------------------------------------------------------------------------- make gpu-wheels


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def build(out: Path, python_version: str = "3.12") -> list[Path]:
    """Fill ``out`` with one wheel per pin for CPython ``python_version`` on manylinux x86-64;
    wheels of other names or versions in ``out`` are removed (two versions of one name would
    stop the install). Returns the wheels."""
    out.mkdir(parents=True, exist_ok=True)
    # DeepSpeed's setup.py imports torch: build against this venv's (no isolated torch download);
    # DS_BUILD_OPS=0 compiles no op, so the wheel is py3-none-any
    env = dict(os.environ, DS_BUILD_OPS="0")
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), *BUILT, env=env)
    plat = [f for p in PLATFORMS for f in ("--platform", f"{p}_x86_64")]
    _pip(
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *plat,
        "-d",
        str(out),
        *DOWNLOADED,
    )
    want = {_norm(p.split("==")[0]): p.split("==")[1] for p in PINS}
    kept = []
    for whl in sorted(out.glob("*.whl")):
        name, version = wheel_name_version(whl)
        if want.get(name) == version:
            kept.append(whl)
        else:
            whl.unlink()
    missing = set(want) - {wheel_name_version(w)[0] for w in kept}
    if missing:
        raise SystemExit(f"gpu-wheels: no wheel for {sorted(missing)} in {out}")
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder for the wheels")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (X.Y)")
    p.add_argument(
        "--check", action="store_true", help="only check that --out's wheels resolve offline"
    )
    a = p.parse_args(argv)
    if a.check:
        res = check_resolves(a.out, a.python_version)
        print(f"{len(res['resolved'])} distributions resolve for Python {a.python_version} "
              f"offline (from the machine: {', '.join(res['from_machine'])})")  # fmt: skip
        return 0
    kept = build(a.out, a.python_version)
    total = sum(w.stat().st_size for w in kept)
    for w in kept:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{total / 2**20:7.2f} MiB  in {len(kept)} wheels in {a.out}")
    if total > MAX_MIB * 2**20:
        print(f"gpu-wheels: over {MAX_MIB} MiB, too much to carry", file=sys.stderr)
        return 1
    res = check_resolves(a.out, a.python_version)
    print(f"resolves offline for Python {a.python_version}: {len(res['resolved'])} "
          f"distributions, {', '.join(res['from_machine'])} from the machine")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
