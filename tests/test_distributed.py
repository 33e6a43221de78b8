"""Distributed data-parallel training: sharding arithmetic in-process, and real two-process runs
under torchrun with gloo on CPU (model identical on both ranks, metrics reduced and written once,
every training sample seen exactly once per epoch, a failing or hanging rank stops the run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from microtrain import CheckpointError, distributed
from microtrain.errors import MicrotrainError
from microtrain.sampling import batch_count, epoch_batches

REPO = Path(__file__).resolve().parents[1]
TRAIN_SIZE, TEST_SIZE, BATCH, EVAL_BATCH = 193, 101, 16, 50  # shards 97/96 and 51/50: the empty-last-batch case


# --- sharding arithmetic -------------------------------------------------------------------------

def _all_ranks(n: int, batch: int, world: int, drop_last: bool, epoch: int = 1) -> list[list[np.ndarray]]:
    return [epoch_batches(n, batch, seed=3, epoch=epoch, shuffle=True, drop_last=drop_last, rank=r, world_size=world)
            for r in range(world)]


def test_smaller_shard_gets_no_empty_last_batch():
    """193 samples on 2 ranks in batches of 16: rank 1 (96 samples) must not get an empty 7th batch."""
    ranks = _all_ranks(TRAIN_SIZE, BATCH, 2, drop_last=False)
    assert [len(r) for r in ranks] == [7, 7]
    assert [len(b) for b in ranks[0]] == [16] * 6 + [1]
    assert [len(b) for b in ranks[1]] == [16] * 5 + [15, 1]
    seen = np.sort(np.concatenate([b for r in ranks for b in r]))
    assert np.array_equal(seen, np.arange(TRAIN_SIZE))


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 400), batch=st.integers(1, 40), world=st.integers(1, 5), drop_last=st.booleans(),
       epoch=st.integers(1, 3))
def test_every_rank_same_number_of_nonempty_batches(n, batch, world, drop_last, epoch):
    try:
        ranks = _all_ranks(n, batch, world, drop_last, epoch)
    except MicrotrainError:
        assert not drop_last and world > 1 and (0 < n < world or (batch == 1 and n % world))
        return
    count = batch_count(n, batch, drop_last, world)
    assert all(len(r) == count for r in ranks)
    sizes = [len(b) for r in ranks for b in r]
    assert all(1 <= s <= batch for s in sizes)
    seen = np.concatenate([b for r in ranks for b in r]) if sizes else np.array([], dtype=int)
    assert len(np.unique(seen)) == len(seen)  # never twice
    if drop_last:
        assert all(s == batch for s in sizes) and count == (n // world) // batch
    else:
        assert np.array_equal(np.sort(seen), np.arange(n))  # every sample exactly once


def test_single_process_batches_are_plain_chunks_of_the_order():
    batches = epoch_batches(100, 32, seed=0, epoch=2, shuffle=True, drop_last=False)
    order = np.concatenate(batches)
    assert [len(b) for b in batches] == [32, 32, 32, 4] and sorted(order) == list(range(100))


def test_timeout_from_environment(monkeypatch):
    monkeypatch.setenv("MICROTRAIN_DIST_TIMEOUT", "7.5")
    assert distributed.timeout().total_seconds() == 7.5
    monkeypatch.setenv("MICROTRAIN_DIST_TIMEOUT", "soon")
    with pytest.raises(MicrotrainError, match="MICROTRAIN_DIST_TIMEOUT"):
        distributed.timeout()


def test_resume_guard_refuses_another_world_size():
    guard = distributed.ResumeGuard()
    checkpoint = {"plugins": {}}
    guard.on_checkpoint_save(state=SimpleNamespace(world_size=2), checkpoint=checkpoint)
    guard.on_checkpoint_load(state=SimpleNamespace(world_size=2), checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match="written by a run of 2 process"):
        guard.on_checkpoint_load(state=SimpleNamespace(world_size=1), checkpoint=checkpoint)
    with pytest.raises(CheckpointError, match="written by a run of 1 process"):  # checkpoints from before the guard
        guard.on_checkpoint_load(state=SimpleNamespace(world_size=2), checkpoint={"plugins": {}})


# --- two processes under torchrun ---------------------------------------------------------------

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

# A plugin module for the runs: a dataset whose bottom corner pixels encode the sample index, and
# hooks that record which samples each rank trained on, save each rank's final weights, and fail
# or hang one rank on request (environment variables, so the recipe stays the same on resume).
PROBE = '''
import json, os, time
from pathlib import Path

import numpy as np
import torch

import microtrain
from microtrain.state import ImageData
from microtrain_plugins.data.synthetic import make_images

SEEN = {}


def build_indexed(*, train_size: int, test_size: int, image_size: int = 16) -> ImageData:
    """Synthetic images with the sample index in the bottom corners (below every class square)."""
    rng = np.random.default_rng(1)
    splits = []
    for count in (train_size, test_size):
        images, labels = make_images(count, image_size, 10, rng)
        index = np.arange(count)
        for corner in (0, -1):  # both bottom corners: a horizontal flip swaps them
            images[:, -1, corner, 0], images[:, -1, corner, 1], images[:, -1, corner, 2] = index % 256, index // 256, 0
        splits += [images, labels]
    return ImageData(*splits, [f"c{i}" for i in range(10)], (0.2, 0.25, 0.3), (0.2, 0.21, 0.22))


@microtrain.hookimpl
def register_components(registry):
    registry.data("indexed", build_indexed)


@microtrain.hookimpl
def before_batch(state):
    images = state.batch[0].detach().float().cpu()
    mean = torch.tensor(state.data.mean) * 255.0
    std = torch.tensor(state.data.std) * 255.0
    pixel = (images[:, :, -1, -1] * std + mean).round().long()
    SEEN.setdefault(state.epoch, []).append((pixel[:, 0] + 256 * pixel[:, 1]).tolist())
    if state.epoch == int(os.environ.get("PROBE_EPOCH", "0")) and state.batch_index == 2:
        if os.environ.get("PROBE_FAIL_RANK") == str(state.rank):
            raise RuntimeError("probe failure on purpose")
        if os.environ.get("PROBE_HANG_RANK") == str(state.rank):
            time.sleep(600)


@microtrain.hookimpl
def after_epoch(state):
    batches = SEEN.pop(state.epoch, [])
    (Path(os.environ["PROBE_DIR"]) / f"seen-e{state.epoch}-r{state.rank}.json").write_text(json.dumps(batches))


@microtrain.hookimpl
def after_fit(state):
    torch.save(state.unwrapped_model.state_dict(), Path(os.environ["PROBE_DIR"]) / f"final-r{state.rank}.pt")
'''

RECIPE = f"""
name: dist_probe
epochs: 2
threads: 1
sync_batchnorm: true  # a no-op with a note on CPU
data: {{name: indexed, train_size: {TRAIN_SIZE}, test_size: {TEST_SIZE}, image_size: 16}}
model: {{name: dsconv, width: 0.25, dropout: 0.0}}
loader: {{name: albumentations, batch_size: {BATCH}, eval_batch_size: {EVAL_BATCH}, workers: 0,
         augment: [{{HorizontalFlip: {{p: 0.5}}}}]}}
optimizer: {{name: sgd, lr: 0.05}}
schedule: {{name: onecycle, max_lr: 0.2}}
plugins: [progress, metrics, checkpoint, summary, dist_probe]
"""


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "dist_probe.py").write_text(PROBE)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "out").mkdir()
    return tmp_path


def torchrun(tmp_path: Path, *args: str, timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --standalone --nproc_per_node=2 -m microtrain run ...``; a hang fails the test."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "PROBE_DIR": str(tmp_path / "out"),
               "NO_ALBUMENTATIONS_UPDATE": "1", "MICROTRAIN_DIST_TIMEOUT": "60", **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "microtrain", "run", str(tmp_path / "recipe.yaml"), *args]
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun hung for {timeout}s; output:\n{exc.stdout}\n{exc.stderr}")
    return result, time.monotonic() - start


def single_process_eval(tmp_path: Path, checkpoint: Path) -> tuple[float, float, np.ndarray]:
    """Test loss, accuracy and confusion of a checkpoint, computed here in one plain process."""
    import importlib.util

    from microtrain_plugins.models.dsconv import build_dsconv

    spec = importlib.util.spec_from_file_location("dist_probe_here", tmp_path / "dist_probe.py")
    dist_probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dist_probe)

    data = dist_probe.build_indexed(train_size=TRAIN_SIZE, test_size=TEST_SIZE, image_size=16)
    model = build_dsconv(10, data.image_shape, width=0.25, dropout=0.0)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    model.eval()
    images = torch.from_numpy(data.test_images).permute(0, 3, 1, 2).double() / 255.0
    images = ((images - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(1, 3, 1, 1)).float()
    labels = torch.from_numpy(data.test_labels)
    with torch.no_grad():
        logits = model(images)
    predicted = logits.argmax(1)
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    loss = F.cross_entropy(logits.double(), labels, reduction="sum").item() / TEST_SIZE
    return loss, 100.0 * int((predicted == labels).sum()) / TEST_SIZE, confusion


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_each_sample_once(out: Path, epoch: int) -> None:
    ranks = [json.loads((out / f"seen-e{epoch}-r{r}.json").read_text()) for r in range(2)]
    assert [len(batches) for batches in ranks] == [7, 7]  # same number of steps on both ranks
    assert all(len(batch) >= 1 for batches in ranks for batch in batches)  # no empty batch
    seen = sorted(i for batches in ranks for batch in batches for i in batch)
    assert seen == list(range(TRAIN_SIZE)), f"epoch {epoch}: samples not seen exactly once across ranks"


@needs_gloo
def test_two_ranks_train_like_one_model(probe):
    run = probe / "run"
    result, _ = torchrun(probe, "--run-dir", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    out = probe / "out"

    final = [torch.load(out / f"final-r{r}.pt", weights_only=True) for r in range(2)]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:  # parameters and BatchNorm buffers
        assert torch.equal(final[0][key], final[1][key]), f"{key} differs between ranks"

    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == [1, 2]  # one line per epoch, written once
    assert result.stdout.count("epoch   1/2") == 1 and result.stdout.count("test accuracy: final") == 1
    assert result.stderr.count("sync_batchnorm has no effect on cpu") == 1
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    for epoch in (1, 2):
        assert_each_sample_once(out, epoch)

    checkpoint = run / "checkpoints" / "last.pt"
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(saved[key], final[0][key]) for key in saved)
    loss, acc, confusion = single_process_eval(probe, checkpoint)
    assert int(np.sum(rows[-1]["confusion"])) == TEST_SIZE  # the whole test set, each image once
    assert rows[-1]["test_acc"] == pytest.approx(acc, abs=1e-9)
    assert rows[-1]["test_loss"] == pytest.approx(loss, rel=1e-4)
    assert np.array_equal(np.array(rows[-1]["confusion"]), confusion)


@needs_gloo
def test_failing_rank_stops_the_run_and_resume_completes(probe):
    run = probe / "run"
    result, seconds = torchrun(probe, "--run-dir", str(run), PROBE_FAIL_RANK="1", PROBE_EPOCH="2")
    assert result.returncode != 0
    assert "rank 1 of 2: plugin 'dist_probe' failed in hook 'before_batch': RuntimeError: probe failure on purpose" \
        in result.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["status"] in ("failed", "interrupted")  # rank 0 lost its peer, or torchrun stopped it first
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["plugins"]["microtrain.distributed"] == {"world_size": 2}
    assert [row["epoch"] for row in read_metrics(run)] == [1]

    resumed, _ = torchrun(probe, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [row["epoch"] for row in read_metrics(run)] == [1, 2]
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert_each_sample_once(probe / "out", 2)
    print(f"failing run stopped after {seconds:.1f}s")


@pytest.mark.slow
@needs_gloo
def test_hanging_rank_times_out_with_a_clear_message(probe):
    run = probe / "run"
    result, seconds = torchrun(probe, "--run-dir", str(run), timeout=90, PROBE_HANG_RANK="1", PROBE_EPOCH="1",
                               MICROTRAIN_DIST_TIMEOUT="10")
    assert result.returncode != 0
    assert "rank 0 of 2: lost contact with another rank" in result.stderr, result.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "MICROTRAIN_DIST_TIMEOUT=10s" in status["message"]
    print(f"hanging run stopped after {seconds:.1f}s")
