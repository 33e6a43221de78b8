"""Prepare, here, the files a borrowed GPU machine needs to run benchmarks/gpu_checks.sh without a network.

That machine has Python with torch (a CUDA build), pluggy, pyyaml, rich, matplotlib and opencv, and no
network; what travels with the working tree is at most 64 MiB in all. This script fills ``.whl/`` (ignored
by git; the device tool's ``carry``) with:

- microtrain's own wheel, built from this working tree: its metadata registers the built-in plugins
  (without it every loader and model is "unknown");
- every distribution microtrain and the CUDA tests need beyond that machine's software (albumentations
  and what it imports, scipy included; pytest), at the versions installed in this environment, as wheels
  for the GPU machine's Python (``--python``, default 3.12, the version seen there). One Python only:
  scipy (34 MiB) and stringzilla (4 MiB) for a second one would not fit. On a machine whose Python differs,
  gpu_checks.sh says so in its preflight and runs the tensor-loader steps without augmentation;
- ``carry.json``: what was carried, for which Python, and the sizes.

It prints the size of the working tree that travels, of the wheels and of both together, and fails when
that total reaches the limit. For the default Python it also rewrites ``benchmarks/gpu_carry.json``, the
committed record of the plan and the wheel sizes that tests/test_gpu_checks.py checks without a network.
``gpu_checks.sh`` installs from ``.whl/`` only what the machine lacks.

    python benchmarks/gpu_prepare.py                                  # for the GPU machine (Python 3.12)
    python benchmarks/gpu_prepare.py --python 3.11 --out /tmp/carry   # for this machine's Python (the dry run)
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT_BYTES = 64 * 2**20  # the device tool's limit on the working tree and carried paths together
# What the GPU machine is known to hold (the simulation of it; benchmarks/gpu_checks.sh --dry-run
# makes a virtual environment of exactly these). Everything they pull in is taken to be there too.
GPU_MACHINE_BASE = ("torch", "pluggy", "pyyaml", "rich", "matplotlib", "opencv-python-headless")
TEST_NEEDS = ("pytest",)  # the CUDA tests run under pytest
DEFAULT_PYTHON = "3.12"  # python3 on the GPU machines lent here (docs of the device tool: Python 3.12.3)
LOCK = REPO / "benchmarks" / "gpu_carry.json"
MANYLINUX = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *[f"manylinux_2_{n}_x86_64" for n in range(17, 40)]]


def project_table() -> dict:
    """pyproject.toml's [project], read from the file (the installed metadata may be older)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def project_requirements() -> list[Requirement]:
    """microtrain's runtime requirements."""
    return [Requirement(r) for r in project_table()["dependencies"]]


def target_environment(python: str) -> dict[str, str]:
    """Marker environment of CPython ``python`` (major.minor) on x86-64 Linux."""
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", implementation_name="cpython",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               platform_machine="x86_64", os_name="posix")
    return env


def closure(requirements: list[Requirement], env: dict[str, str]) -> dict[str, str]:
    """Canonical name -> installed version of ``requirements`` and everything they need under ``env``
    (extras left out), read from the metadata installed in this environment."""
    found: dict[str, str] = {}
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({**env, "extra": ""})]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_prepare: {requirement.name} is needed but not installed here; "
                             'run pip install -e ".[dev]" first') from None
        found[name] = dist.version
        for text in dist.requires or []:
            needed = Requirement(text)
            if needed.marker is None or needed.marker.evaluate({**env, "extra": ""}):
                todo.append(needed)
    return found


def carry_plan(python: str) -> dict[str, str]:
    """The distributions (name -> version) the GPU machine lacks for microtrain and its CUDA tests."""
    env = target_environment(python)
    needed = closure([*project_requirements(), *map(Requirement, TEST_NEEDS)], env)
    present = closure(list(map(Requirement, GPU_MACHINE_BASE)), env)
    return {name: version for name, version in sorted(needed.items()) if name not in present}


def travelling_tree_bytes() -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked, not ignored, files."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    return sum((REPO / p).stat().st_size for p in listed if p and (REPO / p).is_file())


def build_microtrain_wheel(out: Path) -> Path:
    """Build microtrain's wheel from a copy of the working tree (the build leaves nothing in the tree)."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    with tempfile.TemporaryDirectory(prefix="microtrain-wheel-") as tmp:
        copy = Path(tmp) / "src"
        for relative in filter(None, listed):
            source = REPO / relative
            if source.is_file():
                (copy / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy / relative)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), str(copy)], check=True)
    wheels = sorted(out.glob("microtrain-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"gpu_prepare: expected one microtrain wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


def download(name: str, version: str, python: str, out: Path) -> list[Path]:
    """The wheel of ``name==version`` for CPython ``python`` on x86-64 Linux (pure Python when that exists)."""
    tag = "cp" + python.replace(".", "")
    before = set(out.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--dest", str(out),
               "--python-version", python, "--implementation", "cp", "--abi", tag, "--abi", "abi3", "--abi", "none",
               *[arg for platform in MANYLINUX for arg in ("--platform", platform)], f"{name}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"gpu_prepare: no wheel of {name}=={version} for Python {python} on x86-64 Linux ({last})")
    return sorted(set(out.glob("*.whl")) - before)


def prepare(out: Path, python: str) -> dict:
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)  # one version of each distribution: two would stop the install there
    out.mkdir(parents=True)
    own = build_microtrain_wheel(out)
    files = [{"file": wheel.name, "name": name, "version": version, "bytes": wheel.stat().st_size}
             for name, version in carry_plan(python).items() for wheel in download(name, version, python, out)]
    wheel_bytes = sum(p.stat().st_size for p in out.glob("*.whl"))
    tree_bytes = travelling_tree_bytes()
    manifest = {
        "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": python, "gpu_machine_base": list(GPU_MACHINE_BASE),
        "microtrain_wheel": own.name, "microtrain_wheel_bytes": own.stat().st_size, "carried": files,
        "wheel_bytes": wheel_bytes, "tree_bytes": tree_bytes, "total_bytes": wheel_bytes + tree_bytes,
        "limit_bytes": CARRY_LIMIT_BYTES, "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "carry.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=DEFAULT_PYTHON, help=f"the GPU machine's Python, major.minor (default {DEFAULT_PYTHON})")
    parser.add_argument("--out", type=Path, default=REPO / ".whl", help="folder to fill (default .whl, emptied first)")
    parser.add_argument("--plan", action="store_true", help="print what would be carried, download nothing")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        parser.error(f"--python takes major.minor such as 3.12, got {args.python!r}")
    if args.plan:
        print(json.dumps(carry_plan(args.python), indent=1))
        return 0
    manifest = prepare(args.out.resolve(), args.python)
    for entry in manifest["carried"]:
        print(f"  {entry['file']:<78} {mib(entry['bytes']):>9}")
    print(f"{args.out}: {manifest['microtrain_wheel']} and {len(manifest['carried'])} wheels for Python {args.python}: "
          f"{mib(manifest['wheel_bytes'])}; working tree that travels {mib(manifest['tree_bytes'])}; together "
          f"{mib(manifest['total_bytes'])} of the {mib(CARRY_LIMIT_BYTES)} limit ({manifest['seconds']} s)")
    if args.python == DEFAULT_PYTHON:
        lock = {k: manifest[k] for k in ("python", "gpu_machine_base", "microtrain_wheel_bytes", "carried", "wheel_bytes")}
        LOCK.write_text(json.dumps(lock, indent=1) + "\n")
        print(f"recorded in {LOCK.relative_to(REPO)} (commit it)")
    if manifest["total_bytes"] >= CARRY_LIMIT_BYTES:
        print("gpu_prepare: over the device tool's limit; shrink the working tree or what is carried", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
