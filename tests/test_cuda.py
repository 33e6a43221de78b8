"""The GPU paths. The CUDA smoke tests run wherever CUDA is present (benchmarks/gpu_checks.sh runs this file on
a borrowed GPU) and are skipped elsewhere; the tests before them check, on the CPU, the parts of those paths
that need no GPU: the engine's deferred non-finite check and the choice of CUDA generator state in checkpoints.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import microtrain
from microtrain import checkpoint as checkpoint_module
from microtrain import engine as engine_module
from microtrain.checkpoint import load_checkpoint, make_checkpoint
from microtrain.cli import main

REPO = Path(__file__).resolve().parents[1]
SEED_RECIPE = REPO / "recipes" / "cifar10_dsconv.yaml"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

# ---------------------------------------------------------------------------------------------
# On the CPU: the check the engine makes on a GPU, read every few steps instead of at every one.

NAN_PROBE = '''
"""Test probe: the loss of global step MT_NAN_STEP becomes NaN; MT_NAN_SIGTERM=1 sends SIGTERM after it."""
import os, signal
import torch
import microtrain

seen = []


@microtrain.hookimpl
def before_batch(state):
    if state.step == int(os.environ.get("MT_NAN_STEP", "0")):
        images, labels = state.batch
        state.batch = (torch.full_like(images, float("nan")), labels)


@microtrain.hookimpl
def after_batch(state):
    seen.append(state.step)
    if os.environ.get("MT_NAN_SIGTERM") == "1" and state.step == int(os.environ.get("MT_NAN_STEP", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
'''

NAN_RECIPE = {
    "name": "deferred_nan",
    "epochs": 2,
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "data": {"name": "synthetic", "train_size": 256, "test_size": 64, "image_size": 16},
    "model": {"name": "dsconv", "dropout": 0.0, "width": 0.5},
    "loader": {"name": "tensor", "batch_size": 32},  # 8 steps per epoch
    "optimizer": {"name": "sgd", "lr": 0.05},
    "schedule": {"name": "onecycle", "max_lr": 0.1},
}
NAN_STEP = 11  # epoch 2, batch 3
READ_EVERY = 4  # the engine reads its check after batches 4 and 8 of each epoch


@pytest.mark.parametrize("case, every_steps, sigterm, last_step", [
    ("read after batch 4", 0, False, 8),  # the read after step 12 stops the run; last.pt is epoch 1's end
    ("checkpoint of step 11", 1, False, 10),  # the checkpoint after step 11 finds it; last.pt is step 10's
    ("SIGTERM after step 11", 0, True, 8),  # the stop's checkpoint finds it: a failure, not an interruption
])
def test_deferred_non_finite_check_names_the_step_and_keeps_the_last_good_checkpoint(
        case, every_steps, sigterm, last_step, tmp_path, monkeypatch, capsys):
    (tmp_path / "mt_nan_probe.py").write_text(NAN_PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = {**NAN_RECIPE, "plugins": ["metrics", {"checkpoint": {"every_steps": every_steps}}, "mt_nan_probe"]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.setattr(engine_module, "non_finite_check_steps", lambda device: READ_EVERY)
    monkeypatch.setenv("MT_NAN_STEP", str(NAN_STEP))
    monkeypatch.setenv("MT_NAN_SIGTERM", "1" if sigterm else "0")
    import mt_nan_probe

    mt_nan_probe.seen.clear()
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--run-dir", str(run_dir)]) == 2, case
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "loss is nan at epoch 2, step 3 (global step 11)" in lines[0], lines
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert max(mt_nan_probe.seen) == NAN_STEP  # the hooks of step 12 never ran: stopped within READ_EVERY steps
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["step"] == last_step
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())
    assert engine_module.FINITE_BATCHES not in checkpoint["epoch_totals"]  # engine bookkeeping, not saved
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


class NoTruthValue(torch.nn.Module):
    """Wraps a model the way torch.compile's OptimizedModule does for this test: asking for its truth value (its
    len()) raises TypeError, as OptimizedModule does in torch 2.13 for a model without a length."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, images):
        return self.inner(images)

    def __len__(self):
        raise TypeError("no len()")


def test_a_model_without_a_truth_value_trains_evaluates_and_reports(tmp_path):
    """compile=true sets state.model and state.eval_model to an OptimizedModule: nothing may call bool() on it."""
    recipe = {**NAN_RECIPE, "epochs": 1, "plugins": ["metrics"]}
    run = microtrain.build_run(recipe, run_dir=tmp_path, callbacks="all")
    run.state.model = run.state.eval_model = NoTruthValue(run.state.model)
    assert run.engine.fit().status == "completed"
    assert run.state.unwrapped_eval_model is not None and "test_acc" in run.evaluate()


class FakeCuda:
    """Records which device's generator torch.cuda was asked to read or set."""

    def __init__(self, devices: int):
        self.devices = devices
        self.set_calls: list[tuple[int, int]] = []

    def get_rng_state(self, device):
        return torch.tensor([device.index], dtype=torch.uint8)

    def set_rng_state(self, state, device):
        self.set_calls.append((int(state[0]), device.index))


@pytest.mark.parametrize("saved, device, world_size, expected", [
    (torch.tensor([1], dtype=torch.uint8), 0, 1, [(1, 0)]),  # this format: the saved GPU's state, into the run's GPU
    (torch.tensor([0], dtype=torch.uint8), 1, 2, [(0, 1)]),  # torchrun rank 1 takes rank 0's state into its own GPU
    ([torch.tensor([i], dtype=torch.uint8) for i in range(4)], 2, 1, [(2, 2)]),  # the old list: the run's GPU's entry
    ([torch.tensor([i], dtype=torch.uint8) for i in range(4)], 1, 2, [(0, 1)]),  # old list under torchrun: rank 0's
    ([torch.tensor([0], dtype=torch.uint8)], 3, 1, []),  # old list of fewer GPUs than the index: nothing, no IndexError
])
def test_checkpoint_restores_only_the_runs_own_cuda_generator(saved, device, world_size, expected, monkeypatch):
    fake = FakeCuda(devices=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    state = checkpoint_module.rng_state()  # no CUDA device given: no CUDA state saved
    assert "cuda" not in state
    checkpoint_module.set_rng_state({**state, "cuda": saved}, torch.device("cuda", device), world_size)
    assert fake.set_calls == expected


def test_checkpoint_saves_the_runs_own_cuda_generator_alone(monkeypatch):
    fake = FakeCuda(devices=4)
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    state = checkpoint_module.rng_state(torch.device("cuda", 2))
    assert torch.equal(state["cuda"], torch.tensor([2], dtype=torch.uint8))
    assert "cuda" not in checkpoint_module.rng_state(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# On a GPU.

def cuda_run(tmp_path: Path, *overrides: str, callbacks="all", **options) -> microtrain.Run:
    """The seed recipe on CUDA, on synthetic data of CIFAR-10's image size: 8 steps of 64 images per epoch."""
    tmp_path.mkdir(parents=True, exist_ok=True)  # the run dir: plugins write there from before_fit on
    return microtrain.build_run(SEED_RECIPE, ["device=cuda", "epochs=1", "data.name=synthetic", "data.train_size=512",
                                              "data.test_size=128", "loader.batch_size=64", "plugins=[progress, metrics]",
                                              *overrides], run_dir=tmp_path, callbacks=callbacks, **options)


class BatchProbe:
    """Records every training batch's placement and a checksum of its contents."""

    def __init__(self):
        self.batches: list[dict] = []

    @microtrain.hookimpl
    def before_batch(self, state):
        images, labels = state.batch
        self.batches.append({"step": state.step, "images_cuda": images.is_cuda, "labels_cuda": labels.is_cuda,
                             "channels_last": images.is_contiguous(memory_format=torch.channels_last),
                             "sum": images.double().sum(), "labels": labels.clone()})


@needs_cuda
@pytest.mark.parametrize("loader", ["tensor", "albumentations"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engine_trains_on_cuda(loader, precision, tmp_path):
    probe = BatchProbe()
    run = cuda_run(tmp_path, f"loader.name={loader}", f"precision={precision}", "channels_last=true",
                   extra_plugins={"batch-probe": probe})
    state = run.engine.fit()
    assert state.status == "completed" and len(probe.batches) == 8
    assert all(b["images_cuda"] and b["labels_cuda"] and b["channels_last"] for b in probe.batches)
    metrics = state.history[-1]
    assert torch.isfinite(torch.tensor([metrics["train_loss"], metrics["test_loss"]])).all()


@needs_cuda
@pytest.mark.parametrize("loader", ["tensor", "albumentations"])
def test_mid_epoch_resume_on_cuda_gives_the_same_batches(loader, tmp_path):
    saved: dict = {}

    class SaveAtStep3:
        @microtrain.hookimpl(trylast=True)
        def after_batch(self, state):
            if state.step == 3:
                buffer = io.BytesIO()
                torch.save(make_checkpoint(state, mid_epoch=True), buffer)
                saved["checkpoint"] = buffer.getvalue()

    whole = BatchProbe()
    cuda_run(tmp_path / "whole", f"loader.name={loader}",
             extra_plugins={"batch-probe": whole, "save": SaveAtStep3()}).engine.fit()
    resumed = BatchProbe()
    checkpoint = torch.load(io.BytesIO(saved["checkpoint"]), map_location="cpu", weights_only=True)
    cuda_run(tmp_path / "resumed", f"loader.name={loader}", checkpoint=checkpoint,
             extra_plugins={"batch-probe": resumed}).engine.fit()
    after = [b for b in whole.batches if b["step"] > 3]
    assert [b["step"] for b in resumed.batches] == [b["step"] for b in after] == list(range(4, 9))
    for a, b in zip(after, resumed.batches, strict=True):
        assert torch.equal(a["sum"], b["sum"]) and torch.equal(a["labels"], b["labels"])


class DeviceBatches:
    """A loader that hands out batches already on the GPU and turns CUDA's sync debug mode to "error" from the
    second batch until the epoch's last step is done, so any host synchronisation in those steps raises."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for number, batch in enumerate(self.batches):
                if number == 1:  # the first step may synchronise once (lazy CUDA and cuDNN set-up)
                    torch.cuda.set_sync_debug_mode("error")
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode("default")  # before the epoch's end, which reads its figures on purpose


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_make_no_host_synchronisation(precision, tmp_path):
    run = cuda_run(tmp_path, "loader.name=tensor", f"precision={precision}")
    loader = run.state.train_loader
    loader.set_epoch(1)
    run.state.train_loader = DeviceBatches(list(loader))
    run.engine.non_finite_check_steps = 10**6  # only the epoch's end reads the check here
    state = run.engine.fit()  # raises RuntimeError at the first synchronising call of steps 2-8
    assert state.status == "completed"


@needs_cuda
def test_tensor_loader_batches_make_no_host_synchronisation(tmp_path):
    """The loader's share of a step: every batch after the first is made without waiting for the GPU."""
    loader = cuda_run(tmp_path, "loader.name=tensor").state.train_loader
    loader.set_epoch(1)
    batches = iter(loader)
    next(batches)  # the epoch's start copies the shuffled order to the GPU once
    torch.cuda.set_sync_debug_mode("error")
    try:
        count = 1 + sum(1 for _ in batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert count == len(loader)


def test_progress_shows_the_loss_of_a_cpu_run_as_it_is():
    from microtrain_plugins.callbacks.progress import LossReader

    assert LossReader().read(torch.tensor(2.25)) == 2.25


def test_progress_bar_on_a_terminal_shows_the_running_loss(tmp_path, monkeypatch):
    from microtrain_plugins.callbacks import progress

    shown = []
    original = progress.LossReader.read
    monkeypatch.setattr(progress.Progress, "interactive", property(lambda self: True))
    monkeypatch.setattr(progress.LossReader, "read", lambda self, loss: shown.append(original(self, loss)) or shown[-1])
    recipe = {**NAN_RECIPE, "epochs": 1, "plugins": [{"progress": {"refresh_steps": 2}}]}
    state = microtrain.build_run(recipe, run_dir=tmp_path / "run").engine.fit()
    assert state.status == "completed"
    assert len(shown) == state.steps_per_epoch // 2 and all(isinstance(v, float) and v > 0 for v in shown)


@needs_cuda
def test_progress_reads_the_loss_without_waiting_for_the_gpu():
    """The progress bar's loss on a terminal: a pinned copy read once it has arrived, never a wait."""
    from microtrain_plugins.callbacks.progress import LossReader

    reader = LossReader()
    loss = torch.tensor(1.5, device="cuda")
    reader.read(loss)  # the first read allocates the pinned buffer
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        shown = reader.read(loss * 2)  # the first copy has arrived: 1.5; the copy of 3.0 is queued
        queued = reader.read(loss * 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert shown == 1.5 and queued in (1.5, 3.0)
    torch.cuda.synchronize()
    assert reader.read(loss) == 6.0


# Last: compiling takes the longest, and benchmarks/gpu_checks.sh may stop the file at its time limit.
@needs_cuda
def test_compiled_model_trains_with_the_tensor_loader(tmp_path):
    state = cuda_run(tmp_path, "loader.name=tensor", "compile=true", "precision=bf16").engine.fit()
    assert state.status == "completed"
    assert torch.isfinite(torch.tensor(state.history[-1]["train_loss"]))
