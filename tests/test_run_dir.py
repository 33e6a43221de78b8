"""The run-dir rules (docs/reliability.md#run-dirs): one writer at a time, an existing run never replaced
without --force (and then moved aside whole), a --resume --force that applies every change it records or
refuses it by name, a closed stdout that does not end training, and commands that refuse or fail leaving
the run dir byte for byte as it was.

Commands run in this process through ``microtrain.cli.main`` where they can (fast); the ones that need a
second live process or a closed pipe are subprocesses, stopped at a chosen step by a probe plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from microtrain.checkpoint import load_checkpoint
from microtrain.cli import main
from microtrain.errors import MicrotrainError
from microtrain.rundir import LOCK_FILE, RunDirLock, claim_new_dir, run_status

SUBPROCESS_TIMEOUT = 300

RECIPE = {
    "name": "rundir",
    "epochs": 2,
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "deterministic": True,
    "data": {"name": "synthetic", "train_size": 256, "test_size": 64, "image_size": 16},
    "model": {"name": "dsconv", "width": 0.5},
    "loader": {"name": "albumentations", "batch_size": 64, "workers": 0, "augment": [{"HorizontalFlip": {"p": 0.5}}]},
    "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 5.0e-4},
    "schedule": {"name": "onecycle", "max_lr": 0.1},
    "plugins": ["metrics", "checkpoint", "rundir_probe"],  # 4 steps per epoch, 8 in all
}

PROBE = '''
"""Test probe: RUNDIR_PROBE=pause:STEP:NOW:GO writes NOW after global step STEP and waits for GO;
fail-load makes restoring a checkpoint fail, pause-load:NOW:GO pauses it; stop:STEP raises KeyboardInterrupt after
that step."""
import os, time
import microtrain


def _probe():
    action, _, args = os.environ.get("RUNDIR_PROBE", "").partition(":")
    return action, args.split(":") if args else []


@microtrain.hookimpl
def after_batch(state):
    action, args = _probe()
    if action == "pause" and state.step == int(args[0]):
        open(args[1], "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(args[2]) and time.monotonic() < deadline:
            time.sleep(0.02)
    if action == "stop" and state.step == int(args[0]):
        raise KeyboardInterrupt


@microtrain.hookimpl
def on_checkpoint_load(state, checkpoint):
    action, args = _probe()
    if action == "fail-load":
        raise RuntimeError("probe cannot restore its state")
    if action == "pause-load":
        open(args[0], "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(args[1]) and time.monotonic() < deadline:
            time.sleep(0.02)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rundir")
    (folder / "rundir_probe.py").write_text(PROBE)
    recipe = folder / "rundir.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return folder, recipe


@contextlib.contextmanager
def _restored_torch_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(autouse=True)
def _isolate(setup, monkeypatch):
    monkeypatch.syspath_prepend(str(setup[0]))
    monkeypatch.delenv("RUNDIR_PROBE", raising=False)
    with _restored_torch_settings():
        yield


def microtrain(setup, *args) -> int:
    return main(["run", str(setup[1]), *map(str, args)])


def run_module_scoped(setup, *args, probe: str = "") -> int:
    """For module fixtures, which the function-scoped ``_isolate`` does not cover."""
    sys.path.insert(0, str(setup[0]))
    old = os.environ.pop("RUNDIR_PROBE", None)
    if probe:
        os.environ["RUNDIR_PROBE"] = probe
    try:
        with _restored_torch_settings(), contextlib.redirect_stderr(io.StringIO()):
            return microtrain(setup, *args)
    finally:
        sys.path.remove(str(setup[0]))
        os.environ.pop("RUNDIR_PROBE", None)
        if old is not None:
            os.environ["RUNDIR_PROBE"] = old


def start(setup, *args, probe: str = "", **popen) -> subprocess.Popen:
    folder, recipe = setup
    env = {**os.environ, "RUNDIR_PROBE": probe, "NO_ALBUMENTATIONS_UPDATE": "1",
           "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-m", "microtrain", "run", str(recipe), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"the run never reached the probe: {process.poll()} {process.stderr.read() if process.poll() is not None else ''}"


def hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones and the lock included) with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "status.json").read_text())["status"]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def completed(setup, tmp_path_factory) -> Path:
    """A finished 2-epoch run, never to be changed: tests copy it."""
    run_dir = tmp_path_factory.mktemp("completed") / "run"
    assert run_module_scoped(setup, "--run-dir", run_dir) == 0
    return run_dir


@pytest.fixture(scope="module")
def interrupted(setup, tmp_path_factory) -> Path:
    """A run interrupted after step 6 (epoch 2, batch 2; its last.pt is epoch 1's end), never to be changed."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    assert run_module_scoped(setup, "--run-dir", run_dir, probe="stop:6") == 130
    return run_dir


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """Uninterrupted runs with changed recipes, made once: what a re-planned resume must match."""
    folder = tmp_path_factory.mktemp("straight")

    def made(*overrides: str) -> Path:
        run_dir = folder / "-".join(overrides)
        if not run_dir.exists():
            assert run_module_scoped(setup, *overrides, "--run-dir", run_dir) == 0
        return run_dir

    return made


def copy_of(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


# --- 1. an existing run is never replaced without --force --------------------------------------------

@pytest.mark.parametrize("which", ["completed", "interrupted"])
def test_run_dir_of_an_existing_run_is_refused_and_left_as_it_was(setup, request, tmp_path, capsys, which):
    run_dir = copy_of(request.getfixturevalue(which), tmp_path)
    before = hashes(run_dir)
    assert microtrain(setup, "--run-dir", run_dir) == 2
    line = one_error_line(capsys)
    assert f"run dir '{run_dir}' already holds a run" in line and which in line
    assert f"--resume {run_dir}" in line and "--force" in line
    assert hashes(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_force_moves_the_old_run_aside_whole_and_starts_afresh(setup, completed, tmp_path, capsys):
    run_dir = copy_of(completed, tmp_path)
    before = hashes(run_dir)
    assert microtrain(setup, "epochs=1", "--run-dir", run_dir, "--force") == 0
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert f"moved the run that was in '{run_dir}' to '{aside}'" in capsys.readouterr().err
    assert hashes(aside) == before  # the old run, every byte of it
    assert epochs_logged(run_dir) == [1] and status(run_dir) == "completed"
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["epochs"] == 1
    # one epoch writes last.pt once: a previous.pt here would be the old run's, mixed into the new one
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best.json", "best.pt", "last.pt"]


def test_an_empty_or_new_run_dir_is_used_and_default_run_dirs_never_collide(setup, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert microtrain(setup, "epochs=1", "--run-dir", empty) == 0
    assert status(empty) == "completed" and not (empty / LOCK_FILE).exists()
    taken = tmp_path / "runs" / "stamp"
    taken.mkdir(parents=True)
    assert claim_new_dir(taken) == tmp_path / "runs" / "stamp-2"  # two runs started in the same second
    assert claim_new_dir(taken) == tmp_path / "runs" / "stamp-3"


# --- 2. --resume --force: every change applied, or refused by name ----------------------------------

def test_resume_force_applies_changed_learning_rate_and_weight_decay(setup, completed, straight, tmp_path, capsys):
    """Resumed from epoch 1's checkpoint, epoch 2 trains with the new max_lr and weight decay, not the restored ones."""
    run_dir = copy_of(completed, tmp_path)
    changes = ("schedule.max_lr=0.3", "optimizer.weight_decay=0.01")
    assert microtrain(setup, *changes, "--resume", run_dir / "checkpoints" / "previous.pt", "--force") == 0
    assert "re-planned" in capsys.readouterr().err
    resumed, original, planned = metrics(run_dir), metrics(completed), metrics(straight(*changes))
    assert [row["epoch"] for row in resumed] == [1, 2] and resumed[0] == original[0]
    assert resumed[1]["lr"] == pytest.approx(planned[1]["lr"], rel=1e-9) != pytest.approx(original[1]["lr"])
    assert resumed[1]["test_loss"] != original[1]["test_loss"]
    groups = load_checkpoint(run_dir / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 0.01 and groups[0]["max_lr"] == 0.3
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["schedule"]["max_lr"] == 0.3 and saved["optimizer"]["weight_decay"] == 0.01


def test_more_epochs_for_a_completed_onecycle_run_replans_the_schedule(setup, completed, straight, tmp_path, capsys):
    """The schedule is rebuilt for 4 epochs and continues at step 8: epochs 3 and 4 get the 4-epoch plan's rates."""
    run_dir = copy_of(completed, tmp_path)
    assert microtrain(setup, "epochs=4", "--resume", run_dir, "--force") == 0
    assert "re-planned for 4 epochs (16 steps); at step 8" in capsys.readouterr().err
    resumed, planned = metrics(run_dir), metrics(straight("epochs=4"))
    assert [row["epoch"] for row in resumed] == [1, 2, 3, 4] and status(run_dir) == "completed"
    assert [row["lr"] for row in resumed[2:]] == pytest.approx([row["lr"] for row in planned[2:]], rel=1e-9)
    assert resumed[:2] == metrics(completed)
    assert microtrain(setup, "epochs=4", "--resume", run_dir) == 0  # recorded: a plain resume now agrees
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "named"), [
    (["model.width=1.0", "seed=1", "loader.batch_size=32"], ["model.width", "seed", "loader.batch_size"]),
    (["optimizer.name=adamw"], ["optimizer.name"]),
    (["data.train_size=128"], ["data.train_size"]),
    (["epochs=1"], ["epochs=1 is fewer than the 2 epoch(s)"]),
])
def test_resume_force_refuses_what_it_cannot_apply_and_changes_nothing(setup, completed, tmp_path, capsys, overrides,
                                                                       named):
    run_dir = copy_of(completed, tmp_path)
    before = hashes(run_dir)
    assert microtrain(setup, *overrides, "--resume", run_dir, "--force") == 2
    line = one_error_line(capsys)
    assert all(name in line for name in named), line
    assert hashes(run_dir) == before


def test_a_resume_that_fails_while_restoring_changes_nothing(setup, completed, tmp_path, monkeypatch, capsys):
    """Failing after the checks (here a plugin cannot restore its state): recipe.yaml and status.json untouched,
    and a plain resume of the completed run still works."""
    run_dir = copy_of(completed, tmp_path)
    before = hashes(run_dir)
    monkeypatch.setenv("RUNDIR_PROBE", "fail-load")
    assert microtrain(setup, "epochs=5", "--resume", run_dir, "--force") == 2
    assert "probe cannot restore its state" in one_error_line(capsys)
    assert hashes(run_dir) == before and status(run_dir) == "completed"
    monkeypatch.delenv("RUNDIR_PROBE")
    assert microtrain(setup, "--resume", run_dir) == 0
    assert hashes(run_dir) == before  # nothing left to train: nothing written


def test_a_signal_before_training_stops_the_command_and_changes_nothing(setup, interrupted, tmp_path):
    """SIGTERM while the resume is being built (here: restoring the checkpoint): exit 130, the run as it was."""
    run_dir, now, go = copy_of(interrupted, tmp_path), tmp_path / "now", tmp_path / "go"
    before = hashes(run_dir)
    process = start(setup, "--resume", run_dir, probe=f"pause-load:{now}:{go}")
    wait_for(now, process)
    process.send_signal(signal.SIGTERM)
    go.touch()
    _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert hashes(run_dir) == before


def test_damaged_checkpoint_or_unchanged_resume_without_force_changes_nothing(setup, completed, tmp_path, capsys):
    run_dir = copy_of(completed, tmp_path)
    best = run_dir / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    before = hashes(run_dir)
    assert microtrain(setup, "--resume", best) == 2
    assert "is corrupt" in one_error_line(capsys)
    assert microtrain(setup, "epochs=3", "--resume", run_dir) == 2
    assert "add --force" in one_error_line(capsys)
    assert hashes(run_dir) == before


# --- 3. one writer at a time ----------------------------------------------------------------------

def test_a_second_resume_is_refused_while_one_runs(setup, interrupted, tmp_path, capsys):
    """Two resumes at once used to both write (metrics.jsonl epochs 1,2,2): the second is refused, naming the first."""
    run_dir, now, go = copy_of(interrupted, tmp_path), tmp_path / "now", tmp_path / "go"
    first = start(setup, "--resume", run_dir, probe=f"pause:6:{now}:{go}")
    try:
        wait_for(now, first)
        assert status(run_dir) == "running" and run_status(run_dir).status == "running"
        assert microtrain(setup, "--resume", run_dir) == 2
        line = one_error_line(capsys)
        assert f"run dir '{run_dir}' is in use by pid {first.pid} on host {socket.gethostname()}" in line
        assert microtrain(setup, "--run-dir", run_dir, "--force") == 2  # nor replaced while it runs
        assert f"is in use by pid {first.pid}" in one_error_line(capsys)
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert first.returncode == 0, stderr
    assert epochs_logged(run_dir) == [1, 2] and status(run_dir) == "completed"
    assert not list(tmp_path.glob("run.replaced-*")) and not (run_dir / LOCK_FILE).exists()


def test_a_log_that_two_processes_wrote_is_refused_by_the_report_not_averaged(setup, completed, tmp_path, capsys):
    run_dir = copy_of(completed, tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")  # epochs 1, 2, 2
    before = hashes(run_dir)
    assert main(["report", str(run_dir)]) == 2
    assert "metrics.jsonl:3: epoch 2 again (first on line 2): two processes wrote this run" in one_error_line(capsys)
    assert hashes(run_dir) == before


def test_a_stale_lock_is_taken_over_on_this_host_and_refused_from_another(setup, interrupted, tmp_path, capsys):
    run_dir = copy_of(interrupted, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = run_dir / LOCK_FILE
    lock.write_text(json.dumps({"pid": 123456789, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    before = hashes(run_dir)
    assert microtrain(setup, "--resume", run_dir) == 2
    line = one_error_line(capsys)
    assert "pid 123456789 on host elsewhere" in line and f"delete '{lock}'" in line
    assert hashes(run_dir) == before

    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert run_status(run_dir).status == "interrupted"
    assert microtrain(setup, "--resume", run_dir) == 0
    assert f"was left by pid {int(dead.stdout)}" in capsys.readouterr().err
    assert status(run_dir) == "completed" and not lock.exists()


def test_report_of_a_killed_run_says_it_is_not_running(setup, completed, tmp_path):
    """What a SIGKILL leaves: status.json 'running' and the lock file of a process that is gone."""
    run_dir = copy_of(completed, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "message": ""}))
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert main(["report", str(run_dir)]) == 0
    record = json.loads((run_dir / "report" / "report.json").read_text())
    assert record["status"] == "interrupted"
    assert f"{int(dead.stdout)} on host" in (run_dir / "report" / "report.md").read_text()
    assert status(run_dir) == "running"  # a report only reads the run's state


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    first = RunDirLock.acquire(tmp_path)
    try:
        first.take("first")
        with pytest.raises(MicrotrainError, match=f"in use by pid {os.getpid()}"):
            RunDirLock.acquire(tmp_path)
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunDirLock.acquire(tmp_path).release()


# --- 4. output that no one reads does not end training ----------------------------------------------

def test_closed_stdout_does_not_end_the_run(setup, tmp_path):
    """`microtrain run ... | head -1`: the reader goes away after the first line; the run trains to its end."""
    run_dir, now, go = tmp_path / "run", tmp_path / "now", tmp_path / "go"
    process = start(setup, "plugins=[progress, metrics, checkpoint, summary, rundir_probe]", "--run-dir", run_dir,
                    probe=f"pause:1:{now}:{go}")
    first_line = process.stdout.readline()
    wait_for(now, process)
    process.stdout.close()
    go.touch()
    stderr = process.stderr.read()
    process.wait(timeout=SUBPROCESS_TIMEOUT)
    assert "rundir" in first_line
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert status(run_dir) == "completed" and epochs_logged(run_dir) == [1, 2]


# --- properties ----------------------------------------------------------------------------------

OVERRIDES = ["epochs=1", "epochs=3", "seed=1", "model.width=1.0", "schedule.max_lr=0.2", "optimizer.weight_decay=0.001",
             "loader.batch_size=32", "label_smoothing=0.1", "optimizer.name=adamw", "epoch=3", "epochs=x"]


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(which="completed", mode="run-dir", overrides=[])  # overwrote the run with exit 0
@example(which="completed", mode="resume --force", overrides=["epochs=3"])  # failed, leaving recipe.yaml changed
@example(which="interrupted", mode="resume --force", overrides=["schedule.max_lr=0.2", "seed=1"])
@given(which=st.sampled_from(["completed", "interrupted"]),
       mode=st.sampled_from(["run-dir", "run-dir --force", "resume", "resume --force", "resume previous.pt --force"]),
       overrides=st.lists(st.sampled_from(OVERRIDES), max_size=2, unique=True))
def test_any_command_on_an_existing_run_exits_0_or_2_and_a_refusal_changes_nothing(setup, completed, interrupted, which,
                                                                                 mode, overrides):
    original = completed if which == "completed" else interrupted
    with tempfile.TemporaryDirectory() as folder:
        run_dir = copy_of(original, Path(folder))
        before = hashes(run_dir)
        target = run_dir / "checkpoints" / "previous.pt" if "previous.pt" in mode else run_dir
        args = [*overrides, "--run-dir" if mode.startswith("run-dir") else "--resume", target]
        args += ["--force"] if "--force" in mode else []
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = microtrain(setup, *args)
        assert code in (0, 2), err.getvalue()
        assert "Traceback" not in err.getvalue()
        assert len(err.getvalue().strip().splitlines()) == 1 or code == 0, err.getvalue()
        asides = [p for p in Path(folder).iterdir() if p.name.startswith("run.replaced-")]
        for run in [run_dir, *asides]:
            assert status(run) != "running" and run_status(run).status != "running"
            assert not (run / LOCK_FILE).exists()
        if code == 2 or mode == "run-dir":  # refused, or never allowed to touch the run
            assert hashes(run_dir) == before and not asides
        elif mode == "run-dir --force":
            assert [hashes(aside) for aside in asides] == [before]
