"""Run dirs written by microtrain 0.1.0 as first released (built-ins installed as a top-level ``plugins``
package, bare callback names in recipe.yaml) keep working: they resume, and train exactly as before.

tests/fixtures/v010_run was made by that release (commit e371364) with

    STOP_AT=2:2 python -m microtrain run recipe.yaml --run-dir run

where ``stop_mid_epoch`` sends SIGINT after step 2 of epoch 2: the run saved a mid-epoch checkpoint
(with EMA weights) and was marked interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "v010_run"
TIMELESS = ("epoch_seconds", "train_images_per_second", "wall_seconds")


def _microtrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("STOP_AT", None)
    return subprocess.run([sys.executable, "-m", "microtrain", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMELESS} for row in rows]


def test_a_run_interrupted_under_0_1_0_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(FIXTURE, work)
    assert json.loads((work / "run" / "status.json").read_text())["status"] == "interrupted"

    resumed = _microtrain("run", "recipe.yaml", "--resume", "run", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((work / "run" / "status.json").read_text())["status"] == "completed"

    straight = _microtrain("run", "recipe.yaml", "--run-dir", "straight", cwd=work)
    assert straight.returncode == 0, straight.stderr
    # Epoch 1 was trained by 0.1.0 alone, epoch 2 half by 0.1.0 and half by this version: both equal this
    # version's uninterrupted run, so neither the checkpoint format nor the training changed.
    assert _metrics(work / "run") == _metrics(work / "straight")
