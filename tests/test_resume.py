"""Never lose a run: kill (SIGKILL) at several points, Ctrl-C, SIGTERM, SIGHUP, a NaN loss, a failing plugin, a
damaged checkpoint; every resumed run must end with exactly the metrics and weights of an uninterrupted run.

Runs that must die by a signal are subprocesses; the others (references, resumes) run in this process
through ``microtrain.cli.main`` to save the start-up cost. A probe plugin module (written to a temporary
folder, named in the recipe so every run has the same recipe) acts only when ``MT_PROBE`` says so.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from microtrain.checkpoint import load_checkpoint
from microtrain.cli import main
from microtrain.rundir import run_status

TIMING = ("epoch_seconds", "train_images_per_second")
SUBPROCESS_TIMEOUT = 300  # seconds; generous: CI machines can be slow and busy

PROBE = '''
"""Test probe: MT_PROBE=ACTION:ARGS makes this run misbehave at a chosen point; unset, it does nothing."""
import io, os, signal, time
import torch
import microtrain


def _probe():
    action, _, args = os.environ.get("MT_PROBE", "").partition(":")
    return action, args.split(":") if args else []


@microtrain.hookimpl
def before_fit(state):
    action, args = _probe()
    if action != "kill-save":  # SIGKILL half-way through the N-th checkpoint write, after BYTES bytes
        return
    nth, nbytes, real, calls = int(args[0]), int(args[1]), torch.save, [0]

    def save(obj, handle, *a, **k):
        calls[0] += 1
        if calls[0] < nth:
            return real(obj, handle, *a, **k)
        buffer = io.BytesIO()
        real(obj, buffer, *a, **k)
        handle.write(buffer.getvalue()[:nbytes])
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


@microtrain.hookimpl
def before_batch(state):
    action, args = _probe()
    if action == "kill-step" and state.step == int(args[0]):  # SIGKILL as global step N starts
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "nan-step" and state.step == int(args[0]):  # the loss of step N becomes NaN
        images, labels = state.batch
        state.batch = (torch.full_like(images, float("nan")), labels)


@microtrain.hookimpl
def after_batch(state):
    action, args = _probe()
    if action == "signal-step" and state.step == int(args[0]):  # SIG sent COUNT times after step N
        for _ in range(int(args[2])):
            os.kill(os.getpid(), getattr(signal, args[1]))
    if action == "marker-step" and state.step == int(args[0]):  # say "now", then give the test time to signal
        open(args[1], "w").close()
        time.sleep(3)
    if action == "raise-step" and state.step == int(args[0]):
        raise RuntimeError("probe exploded")
    if action == "pause-step" and state.step == int(args[0]):  # say "now" (file 1), then wait for file 2
        open(args[1], "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(args[2]) and time.monotonic() < deadline:
            time.sleep(0.02)


@microtrain.hookimpl
def on_error(state, error):
    path = os.environ.get("MT_ONERROR_FILE")
    if path:
        with open(path, "w") as handle:
            handle.write(type(error).__name__)
'''

RECIPE = {
    "name": "resume",
    "epochs": 2,
    "seed": 3,
    "device": "cpu",
    "threads": 1,
    "deterministic": True,
    "data": {"name": "synthetic", "train_size": 256, "test_size": 128, "image_size": 16},
    "model": {"name": "dsconv", "dropout": 0.05, "width": 0.5},  # dropout: the torch RNG must be restored exactly
    "loader": {"name": "albumentations", "batch_size": 64, "workers": 0, "augment": [{"HorizontalFlip": {"p": 0.5}}]},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "onecycle", "max_lr": 0.1},
    # 4 steps per epoch, 8 in all; mid-epoch checkpoints after steps 3 and 6, epoch ends after 4 and 8.
    # torch.save calls: 1 last@3, 2 best@e1, 3 last@e1, 4 last@6, 5 best@e2 (if better), 6 last@e2.
    "plugins": ["metrics", {"checkpoint": {"every_steps": 3}}, "mt_probe"],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The probe module and the recipe every run of this module uses."""
    folder = tmp_path_factory.mktemp("resume")
    (folder / "mt_probe.py").write_text(PROBE)
    recipe = folder / "resume.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return folder, recipe


@pytest.fixture(autouse=True)
def _isolate(setup, monkeypatch):
    """In-process runs change torch's global thread count and determinism: put them back afterwards."""
    monkeypatch.syspath_prepend(str(setup[0]))
    monkeypatch.delenv("MT_PROBE", raising=False)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def run_inprocess(*args: str) -> int:
    return main(["run", *map(str, args)])


def run_subprocess(setup, run_dir: Path, probe: str, **popen) -> subprocess.Popen:
    folder, recipe = setup
    env = {**os.environ, "MT_PROBE": probe, "NO_ALBUMENTATIONS_UPDATE": "1",
           "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-m", "microtrain", "run", str(recipe), "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert metrics(run_dir) == metrics(reference)
    assert len(metrics(run_dir)) == RECIPE["epochs"]
    for name in ("last.pt", "best.pt"):
        ours, theirs = weights(run_dir / "checkpoints" / name), weights(reference / "checkpoints" / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f"{name} weights differ"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    sys.path.insert(0, str(setup[0]))
    try:
        assert run_inprocess(setup[1], "--run-dir", run_dir) == 0
    finally:
        sys.path.remove(str(setup[0]))
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return run_dir


@pytest.mark.parametrize(("probe", "resumes_from"), [
    ("kill-step:2", None),  # before the first checkpoint: the resume runs it again from the start
    ("kill-save:3:20000", (0, 3)),  # during epoch 1's last.pt write: last.pt is still the step-3 one
    ("kill-save:4:100", (1, 0)),  # during step 6's write: last.pt is still epoch 1's end
    ("kill-step:8", (1, 2)),  # mid-epoch 2: last.pt was written after step 6 (epoch 2, batch 2)
])
def test_sigkill_then_resume_matches_uninterrupted_run(setup, reference, tmp_path, probe, resumes_from, capsys):
    run_dir = tmp_path / "run"
    process = run_subprocess(setup, run_dir, probe)
    _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == -signal.SIGKILL, stderr
    # status.json could not be updated, but the lock (its flock went with the process) says the 'running' is stale
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    status = run_status(run_dir)
    assert status.status == "interrupted" and "stale" in status.message and str(process.pid) in status.message
    last = run_dir / "checkpoints" / "last.pt"
    if resumes_from is None:
        assert not last.exists()
    else:
        checkpoint = load_checkpoint(last)  # whatever the kill interrupted, last.pt is a whole, good checkpoint
        assert (checkpoint["epoch"], checkpoint["batch_index"]) == resumes_from
    if probe.startswith("kill-save"):
        assert list((run_dir / "checkpoints").glob(".*.tmp")), "the killed write should have left its temporary file"

    assert run_inprocess(setup[1], "--resume", run_dir) == 0
    assert f"was left by pid {process.pid}" in capsys.readouterr().err  # the resume says it takes over a dead run
    assert_same_run(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the resumed run removed the leftover
    assert not (run_dir / "lock").exists()  # a run that ends, however it ends short of a kill, leaves no lock


def test_sigint_saves_position_prints_resume_command_and_resume_matches(setup, reference, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "now"
    process = run_subprocess(setup, run_dir, f"marker-step:5:{marker}")
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 130, stderr
    assert "SIGINT received: stopping after the current step" in stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted"
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch_index"]) == (1, 1)  # stopped after step 5 = epoch 2, batch 1
    line = next(line for line in stderr.splitlines() if "resume with: " in line)
    assert "interrupted at epoch 2, step 1 of 4" in line
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["microtrain", "run"] and command[-2:] == ["--resume", str(run_dir)]

    assert main(command[1:]) == 0  # the printed command, as printed
    assert_same_run(run_dir, reference)


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"the run never reached the probe (exit status {process.poll()})"


def test_sighup_with_the_terminal_gone_saves_the_position_and_resume_matches(setup, reference, tmp_path):
    """A closed terminal: SIGHUP stops the run like SIGTERM, and the writes to the gone terminal (its messages,
    the resume hint) fail without ending it."""
    run_dir, now, go = tmp_path / "run", tmp_path / "now", tmp_path / "go"
    process = run_subprocess(setup, run_dir, f"pause-step:5:{now}:{go}")
    wait_for(now, process)
    process.stdout.close()  # no one reads the run's output any more
    process.stderr.close()
    process.send_signal(signal.SIGHUP)
    go.touch()
    assert process.wait(timeout=SUBPROCESS_TIMEOUT) == 130
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert run_status(run_dir).status == "interrupted"
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch_index"]) == (1, 1)  # stopped after step 5 = epoch 2, batch 1
    log = (run_dir / "error.log").read_text()
    assert "Interrupted: signal 1" in log and "BrokenPipeError" not in log and "OSError" not in log
    assert run_inprocess(setup[1], "--resume", run_dir) == 0
    assert_same_run(run_dir, reference)


def test_sigterm_in_process_stops_after_the_step(setup, reference, tmp_path, monkeypatch, capfd):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("MT_PROBE", "signal-step:7:SIGTERM:1")
    assert run_inprocess(setup[1], "--run-dir", run_dir) == 130
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone again
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch_index"], checkpoint["step"]) == (1, 3, 7)
    assert "SIGTERM received" in capfd.readouterr().err
    monkeypatch.delenv("MT_PROBE")
    assert run_inprocess(setup[1], "--resume", run_dir) == 0
    assert_same_run(run_dir, reference)


def test_second_signal_abandons_at_once_and_keeps_last_good_checkpoint(setup, reference, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("MT_PROBE", "signal-step:7:SIGINT:2")
    assert run_inprocess(setup[1], "--run-dir", run_dir) == 130
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch_index"]) == (1, 2)  # step 6's: no new checkpoint was made
    assert "resume with: " in capsys.readouterr().err
    monkeypatch.delenv("MT_PROBE")
    assert run_inprocess(setup[1], "--resume", run_dir) == 0
    assert_same_run(run_dir, reference)


@pytest.fixture
def nan_run(setup, tmp_path, monkeypatch, capsys):
    """A run whose loss turns NaN at global step 6 (epoch 2, batch 2)."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("MT_PROBE", "nan-step:6")
    monkeypatch.setenv("MT_ONERROR_FILE", str(tmp_path / "on_error"))
    status = run_inprocess(setup[1], "--run-dir", run_dir)
    monkeypatch.delenv("MT_PROBE")
    monkeypatch.delenv("MT_ONERROR_FILE")
    return run_dir, status, capsys.readouterr().err


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(nan_run, tmp_path):
    run_dir, status, err = nan_run
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "loss is nan at epoch 2, step 2 (global step 6)" in lines[0]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert (tmp_path / "on_error").read_text() == "TrainingStopped"
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["batch_index"], checkpoint["step"]) == (1, 0, 4)  # epoch 1's end
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert [row["epoch"] for row in metrics(run_dir)] == [1]


def test_damaged_last_checkpoint_is_named_and_the_previous_one_resumes(setup, reference, nan_run, capsys):
    run_dir, _, _ = nan_run
    last, previous = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "previous.pt"
    assert load_checkpoint(previous)["step"] == 3  # the last.pt before epoch 1's end
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # e.g. a copy that was cut short
    assert run_inprocess(setup[1], "--resume", run_dir) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"checkpoint '{last}' is corrupt" in lines[0]
    assert load_checkpoint(previous)["step"] == 3  # the failed attempt touched nothing
    command = shlex.split(lines[0].split("an older one is kept: ", 1)[1])
    assert command[-2:] == ["--resume", str(previous)]
    assert main(command[1:]) == 0
    assert_same_run(run_dir, reference)


def test_failing_plugin_is_named_runs_on_error_and_logs_traceback(setup, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("MT_PROBE", "raise-step:2")
    monkeypatch.setenv("MT_ONERROR_FILE", str(tmp_path / "on_error"))
    assert run_inprocess(setup[1], "--run-dir", run_dir) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "plugin 'mt_probe' failed in hook 'after_batch': RuntimeError: probe exploded" in lines[0]
    assert str(run_dir / "error.log") in lines[0]
    assert (tmp_path / "on_error").read_text() == "PluginHookError"
    log = (run_dir / "error.log").read_text()
    assert "Traceback" in log and "probe exploded" in log and "mt_probe.py" in log
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "mt_probe" in status["message"]
