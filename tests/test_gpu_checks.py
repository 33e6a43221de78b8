"""The GPU check's preparation stays honest without a GPU or a network: the carry plan still names what the
recorded carry holds (benchmarks/gpu_carry.json, made by benchmarks/gpu_prepare.py), that carry and the
working tree fit the device tool's limit, microtrain's wheel installs into an environment holding only the
GPU machine's software plus the carried distributions and registers every built-in plugin there, and the
step runner records ok / failed / not run within its budgets. The whole dry run (minutes) is
`bash benchmarks/gpu_checks.sh --dry-run`; its last result is in docs/speed.md.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare():
    return load("gpu_prepare")


@pytest.fixture(scope="module")
def checks():
    return load("gpu_checks")


def test_carry_plan_names_what_the_recorded_carry_holds_and_it_fits(prepare):
    recorded = json.loads(prepare.LOCK.read_text())
    plan = prepare.carry_plan(recorded["python"])
    carried = {entry["name"] for entry in recorded["carried"]}
    assert set(plan) == carried, (
        f"microtrain's needs changed (now {sorted(plan)}, carried {sorted(carried)}): run "
        "python benchmarks/gpu_prepare.py and commit benchmarks/gpu_carry.json")
    assert {"albumentations", "scipy", "pytest"} <= carried
    base = prepare.closure([prepare.Requirement(n) for n in prepare.GPU_MACHINE_BASE],
                           prepare.target_environment(recorded["python"]))
    assert not carried & set(base), "a distribution the GPU machine has is carried"
    tag = "cp" + recorded["python"].replace(".", "")
    assert all(e["file"].endswith("-none-any.whl") or f"-{tag}-" in e["file"] for e in recorded["carried"])
    total = recorded["wheel_bytes"] + prepare.travelling_tree_bytes()
    assert total < prepare.CARRY_LIMIT_BYTES, f"{total / 2**20:.1f} MiB would travel: over the device tool's 64 MiB"


def test_step_budgets_fit_eight_minutes(checks):
    assert sum(budget for _, budget, _ in checks.STEPS) <= checks.BUDGET_SECONDS <= 8 * 60
    assert set(checks.CUDA_STEPS) == {"cuda_tests", "dali", "epoch_throughput_compile"}


def symlink_distributions(names: dict[str, str], site: Path) -> None:
    """Link every top-level file and folder of the installed distributions ``names`` into ``site``."""
    for name in names:
        dist = metadata.distribution(name)
        source = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (source / top).exists() and not (site / top).exists():
                (site / top).symlink_to(source / top)


def test_wheel_installs_beside_only_the_gpu_machines_software_and_registers_every_builtin(prepare, tmp_path):
    """The GPU machine simulated from this environment's own files: its base distributions and the carried
    ones linked into a bare virtual environment, then microtrain's wheel installed there."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    target = prepare.target_environment(version)
    symlink_distributions(prepare.closure([prepare.Requirement(n) for n in prepare.GPU_MACHINE_BASE], target), site)
    symlink_distributions(prepare.carry_plan(version), site)
    wheel = prepare.build_microtrain_wheel(tmp_path / "wheel")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(wheel)], check=True)
    declared = set(prepare.project_table()["entry-points"]["microtrain"])
    code = """
import importlib.util, json, microtrain, microtrain_plugins, microtrain.cli, microtrain.plugin_manager as m
status = microtrain.cli.main(["plugins"])
pm, registry = m.create_plugin_manager()
print(json.dumps({"status": status, "plugins": sorted(name for name, _ in pm.list_name_plugin()),
                  "from": [microtrain.__file__, microtrain_plugins.__file__],
                  "hypothesis": importlib.util.find_spec("hypothesis") is not None}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([python, "-c", code], cwd=tmp_path, env={**env, "NO_ALBUMENTATIONS_UPDATE": "1"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 0
    assert not report["hypothesis"], "the simulated machine sees this environment's other packages"
    assert all(path.startswith(str(site)) for path in report["from"]), report["from"]
    assert declared <= set(report["plugins"]), f"not registered: {sorted(declared - set(report['plugins']))}"


def test_steps_are_recorded_ok_failed_or_timed_out_within_their_budget(checks, tmp_path):
    runner = checks.Checks(tmp_path, sys.executable, budget=60, carry=tmp_path / "no-carry")
    quick, failing, slow = checks.Step("quick", 10), checks.Step("failing", 10), checks.Step("slow", 1)
    assert runner.command_step(quick, [sys.executable, "-c", "print('fine')"])
    assert not runner.command_step(failing, [sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"])
    assert not runner.command_step(slow, [sys.executable, "-c", "import time; time.sleep(30)"])
    summary = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert summary["quick"]["status"] == "ok"
    assert summary["failing"]["status"] == "failed" and summary["failing"]["error"].startswith("exit status 3")
    assert "broken" in summary["failing"]["error"]
    assert summary["slow"]["status"] == "failed" and summary["slow"]["error"].startswith("timed out after")
    assert summary["slow"]["seconds"] < 10
    assert "print('fine')" in (tmp_path / "log.txt").read_text()
