"""The ``report`` callback, the ``microtrain report`` command and the ``tensorboard`` callback.

One short synthetic run (module fixture) produces the report the file tests read; the pure parts
(confusion matrix, per-class table, figures, the prediction pass) are checked on hand-computed cases."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from microtrain.cli import main  # noqa: E402
from microtrain_plugins.callbacks import report as rp  # noqa: E402

PNGS = ("curves.png", "per_class.png", "confusion.png", "misclassified.png", "augmentations.png")
SAMPLES = 24  # report's samples option in the fixture run (the batch holds 32)


def tiny_recipe(folder: Path, plugins: list, epochs: int = 2, **changes) -> Path:
    recipe = {
        "name": "tiny_report",
        "epochs": epochs,
        "seed": 0,
        "threads": 1,
        "data": {"name": "synthetic", "train_size": 256, "test_size": 128, "image_size": 16},
        "model": {"name": "dsconv", "dropout": 0.0},
        "loader": {"name": "albumentations", "batch_size": 32, "workers": 0,
                   "augment": [{"HorizontalFlip": {"p": 0.5}}, {"ToGray": {"p": 0.3}}]},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "onecycle", "max_lr": 0.2},
        "plugins": plugins,
        **changes,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records every call."""

    instances: list[FakeWriter] = []

    def __init__(self, log_dir: str, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, tuple, int]] = []
        self.texts: list[str] = []
        self.closed = False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))

    def add_image(self, tag, image, step, dataformats="CHW"):
        assert dataformats == "HWC" and image.dtype == np.uint8 and image.shape[2] == 3
        self.images.append((tag, image.shape, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-epoch synthetic run with report and tensorboard (fake writer) enabled."""
    folder = tmp_path_factory.mktemp("report_run")
    recipe = tiny_recipe(folder, ["metrics", "checkpoint", {"report": {"samples": SAMPLES}},
                                  {"tensorboard": {"every_steps": 4}}])
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    FakeWriter.instances.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch.utils.tensorboard", fake)
        assert main(["run", str(recipe), "--run-dir", str(folder / "run")]) == 0
    return folder / "run"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    with Image.open(path) as image:
        image.verify()  # checks the chunks' CRCs
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def last_metrics(run_dir: Path) -> dict:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]


# --- files of a finished run ---------------------------------------------------------------------

def test_every_file_is_produced_and_each_png_has_its_size(finished_run: Path) -> None:
    folder = finished_run / "report"
    record = json.loads((folder / "report.json").read_text())
    assert set(rp.FILES) <= {p.name for p in folder.iterdir()}
    assert record["files"] == list(rp.FILES)
    counts = {"curves.png": 0, "per_class.png": 10, "confusion.png": 10,
              "misclassified.png": len(record["misclassified"]), "augmentations.png": SAMPLES}
    for name in PNGS:
        kind = name.removesuffix(".png")
        assert png_size(folder / name) == rp.figure_pixels(kind, counts[name]), name
    assert 0 < len(record["misclassified"]) <= 24
    sizes = {name: png_size(folder / name) for name in PNGS}
    assert all(w >= 600 and h >= 400 for w, h in sizes.values()), sizes


def test_loader_samples_are_the_first_batch_in_real_colours() -> None:
    """De-normalising the loader's batch gives back the dataset's uint8 pixels of that batch."""
    from microtrain.sampling import epoch_batches
    from microtrain.state import LoaderContext
    from microtrain_plugins.data.synthetic import build_synthetic
    from microtrain_plugins.loaders.albumentations_loader import build_albumentations_loader

    data = build_synthetic(train_size=64, test_size=8, image_size=16)
    context = LoaderContext(images=data.train_images, labels=data.train_labels, train=True, device=torch.device("cpu"),
                            seed=3, mean=data.mean, std=data.std, channels_last=True)
    loader = build_albumentations_loader(context, batch_size=16, workers=0)
    loader.set_epoch(5)
    images, labels = rp.loader_samples(loader, data.mean, data.std, 10)
    first = epoch_batches(64, 16, seed=3, epoch=1, shuffle=True, drop_last=False)[0][:10]
    assert np.array_equal(images, data.train_images[first])
    assert np.array_equal(labels, data.train_labels[first])


def test_augmentations_png_is_in_real_colours(finished_run: Path) -> None:
    """The synthetic classes' coloured squares appear in the picture with their true RGB values."""
    from microtrain_plugins.data.synthetic import build_synthetic

    data = build_synthetic(train_size=256, test_size=128, image_size=16)
    with Image.open(finished_run / "report" / "augmentations.png") as image:
        pixels = {tuple(p) for p in np.asarray(image.convert("RGB")).reshape(-1, 3).tolist()}
    squares = {tuple(data.train_images[np.flatnonzero(data.train_labels == c)[0], (c * 3) % 12, (c * 5) % 12].tolist())
               for c in range(10)}
    assert len(squares & pixels) >= 5, "the class colours are missing: the picture is not de-normalised"


def test_report_md_embeds_files_that_exist(finished_run: Path) -> None:
    folder = finished_run / "report"
    text = (folder / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert set(PNGS) <= set(links)
    for link in links:
        assert (folder / link).is_file(), link
    assert "tiny_report" in text and "best test accuracy" in text and "mean test accuracy, last 2 epochs" in text
    assert "| class0 |" in text and "images/s" in text and "torch" in text


def test_lr_per_step_is_recorded_and_plotted(finished_run: Path) -> None:
    saved = json.loads((finished_run / "report" / "lr_steps.json").read_text())
    assert saved["steps_per_epoch"] == 8 and len(saved["lr"]) == 16
    assert max(saved["lr"]) == pytest.approx(0.2)  # onecycle's max_lr, reached inside the run
    assert saved["lr"][-1] < 1e-3 and saved["lr"][0] < 0.05
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [saved["lr"][7], saved["lr"][15]] == pytest.approx([m["lr"] for m in metrics], rel=1e-6)


def test_report_numbers_equal_the_last_epoch(finished_run: Path) -> None:
    record = json.loads((finished_run / "report" / "report.json").read_text())
    last = last_metrics(finished_run)
    assert record["confusion"] == last["confusion"]
    assert {row["name"]: row["accuracy"] for row in record["per_class"]} == pytest.approx(last["per_class_acc"])
    assert record["summary"]["final_test_acc"] == pytest.approx(last["test_acc"])


def test_tensorboard_logs_scalars_and_images(finished_run: Path) -> None:
    writer, = FakeWriter.instances
    assert writer.closed and Path(writer.log_dir) == finished_run / "tensorboard"
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"loss/train", "loss/test", "accuracy/train", "accuracy/test", "epoch/lr", "per_class/class0"} <= tags
    test_acc = [(value, step) for tag, value, step in writer.scalars if tag == "accuracy/test"]
    assert [step for _, step in test_acc] == [8, 16]
    assert test_acc[-1][0] == pytest.approx(last_metrics(finished_run)["test_acc"])
    assert [step for tag, _, step in writer.scalars if tag == "step/loss"] == [4, 8, 12, 16]
    assert [tag for tag, _, _ in writer.texts] == ["recipe"]
    image_tags = [tag for tag, _, _ in writer.images]
    assert image_tags == ["confusion", "confusion", "misclassified"]


# --- hand-computed case --------------------------------------------------------------------------

LABELS = np.array([0, 0, 0, 1, 1, 2, 3, 3])
PREDS = np.array([0, 1, 1, 1, 1, 0, 2, 3])
CLASSES = ["cat", "dog", "ship", "frog", "empty"]  # 'empty' has no test image


def test_confusion_and_class_table_on_a_hand_computed_case() -> None:
    confusion = rp.confusion_matrix(LABELS, PREDS, 5)
    assert confusion.tolist() == [[1, 2, 0, 0, 0], [0, 2, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
    share = rp.normalise_rows(confusion)
    assert share[0].tolist() == pytest.approx([1 / 3, 2 / 3, 0, 0, 0])
    assert share[4].tolist() == [0, 0, 0, 0, 0]
    rows = rp.class_table(confusion, CLASSES)
    got = [(r.name, r.count, r.correct, r.confused_with, r.confused_count) for r in rows]
    assert got == [("cat", 3, 1, "dog", 2), ("dog", 2, 2, None, 0), ("ship", 1, 0, "cat", 1), ("frog", 2, 1, "ship", 1),
                   ("empty", 0, 0, None, 0)]
    assert [r.accuracy for r in rows[:4]] == pytest.approx([100 / 3, 100.0, 0.0, 50.0])
    assert math.isnan(rows[4].accuracy)


def test_figures_show_the_hand_computed_numbers() -> None:
    confusion = rp.confusion_matrix(LABELS, PREDS, 5)
    fig = rp.confusion_figure(confusion, CLASSES, "t")
    ax = fig.axes[0]
    shown = np.asarray(ax.images[0].get_array())
    assert shown == pytest.approx(rp.normalise_rows(confusion) * 100)
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells[(0, 0)] == "33" and cells[(0, 1)] == "67" and cells[(3, 2)] == "50" and cells[(1, 1)] == "100"

    rows = rp.class_table(confusion, CLASSES)
    fig = rp.per_class_figure(rows, "t", reference={"cat": 65, "dog": 75}, reference_name="seed")
    ax = fig.axes[0]
    widths = [bar.get_width() for bar in ax.patches]
    assert widths == pytest.approx([100 / 3, 100.0, 0.0, 50.0, 0.0])
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["33.3", "100.0", "0.0", "50.0", "no images"]
    top_down = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    assert [t.get_text() for t in top_down] == CLASSES  # first class on top
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "seed" in legend and "overall 50.0%" in legend  # 4 correct of 8


def test_prediction_pass_keeps_the_most_confident_mistakes_in_real_colours() -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(8, 4, 4, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    normalised = (torch.from_numpy(raw).permute(0, 3, 1, 2).float() - m) / s
    confidence = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.95, 0.5, 0.85, 0.6])
    logits = torch.full((8, 5), -20.0)
    logits[torch.arange(8), torch.from_numpy(PREDS)] = 0.0
    # the chosen class gets softmax probability `confidence`, the other four share the rest
    logits[torch.arange(8), torch.from_numpy(PREDS)] = torch.log(confidence / ((1 - confidence) / 4))
    logits = logits.masked_fill(logits == -20.0, 0.0)
    lookup = {round(float(x.sum()), 3): i for i, x in enumerate(normalised)}

    def forward(images: torch.Tensor) -> torch.Tensor:
        return torch.stack([logits[lookup[round(float(x.sum()), 3)]] for x in images])

    labels = torch.from_numpy(LABELS)
    collector = rp.MistakeCollector(3, mean, std)
    for batch in (slice(0, 3), slice(3, None)):  # two batches, as the evaluation loop hands them over
        collector(normalised[batch], labels[batch], forward(normalised[batch]))
    found = collector.found
    # mistakes: index 1 (0.6), 2 (0.8), 5 (0.5), 6 (0.85) -> the three most confident: 6, 2, 1
    assert found.confidence.tolist() == pytest.approx([0.85, 0.8, 0.6], abs=1e-5)
    assert found.true.tolist() == [3, 0, 0] and found.predicted.tolist() == [2, 1, 1]
    assert np.array_equal(found.images, raw[[6, 2, 1]])  # exactly the original uint8 pixels


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    callback = rp.build_report()
    state = SimpleNamespace(is_main=False, rank=1, step=0, run_dir=tmp_path, history=[{"epoch": 1}],
                            optimizer=SimpleNamespace(param_groups=[{"lr": 0.1}]))
    callback.before_fit(state)
    callback.before_batch(state)
    callback.after_fit(state)
    callback.on_error(state, RuntimeError("x"))
    assert list(tmp_path.iterdir()) == []
    assert callback.lr_steps == []


# --- the command ---------------------------------------------------------------------------------

def test_report_command_reproduces_the_run(finished_run: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    from_callback = json.loads((copy / "report" / "report.json").read_text())
    (copy / "report" / "lr_steps.json").unlink()  # the command falls back to the checkpoint's record
    for name in PNGS + ("report.md", "report.json"):
        (copy / "report" / name).unlink()
    assert main(["report", str(copy)]) == 0
    assert "report written to" in capsys.readouterr().out
    record = json.loads((copy / "report" / "report.json").read_text())
    last = last_metrics(copy)
    assert record["confusion"] == last["confusion"]
    assert {row["name"]: row["accuracy"] for row in record["per_class"]} == pytest.approx(last["per_class_acc"])
    assert record["per_class"] == from_callback["per_class"]
    assert record["misclassified"] == from_callback["misclassified"]
    assert record["run"]["wall_seconds"] == pytest.approx(from_callback["run"]["wall_seconds"])
    assert json.loads((copy / "report" / "lr_steps.json").read_text())["lr"] == pytest.approx(
        json.loads((finished_run / "report" / "lr_steps.json").read_text())["lr"], rel=1e-6)
    for name in PNGS:
        assert png_size(copy / "report" / name) == png_size(finished_run / "report" / name)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "empty"])
def test_report_command_on_a_bad_metrics_log(finished_run: Path, tmp_path: Path, capsys, damage: str) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    log = copy / "metrics.jsonl"
    if damage == "missing":
        log.unlink()
    elif damage == "corrupt":
        log.write_text(log.read_text().splitlines()[0] + "\n{\"epoch\": 2, \"test_acc\": 1\n")
    else:
        log.write_text("")
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("microtrain: error:")
    assert "metrics" in err and "Traceback" not in err
    if damage == "corrupt":
        assert "metrics.jsonl:2" in err


def test_report_command_on_a_missing_run_dir(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


# --- interrupted runs ----------------------------------------------------------------------------

STOPPER = '''
from pathlib import Path

import microtrain

MARK = Path(__file__).with_suffix(".stopped")


@microtrain.hookimpl
def before_epoch(state):
    if state.epoch == 2 and not MARK.exists():  # once: the resumed run goes on
        MARK.touch()
        raise KeyboardInterrupt
'''


def test_interrupted_run_leaves_a_report_of_what_exists(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "stop_at_epoch_two.py").write_text(STOPPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = tiny_recipe(tmp_path, ["metrics", "checkpoint", "report", "summary", "stop_at_epoch_two"], epochs=3)
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 130
    assert "partial report written" in capsys.readouterr().err
    folder = tmp_path / "run" / "report"
    record = json.loads((folder / "report.json").read_text())
    assert record["status"] == "interrupted"
    assert record["files"] == ["curves.png", "per_class.png", "confusion.png", "report.md", "report.json"]
    assert record["confusion"] == last_metrics(tmp_path / "run")["confusion"]  # epoch 1's
    for name in ("curves.png", "per_class.png", "confusion.png"):
        assert png_size(folder / name) == rp.figure_pixels(name.removesuffix(".png"), 0 if name == "curves.png" else 10)
    assert not (folder / "misclassified.png").exists()
    text = (folder / "report.md").read_text()
    assert "interrupted" in text and "microtrain report RUN_DIR" in text
    assert all((folder / link).is_file() for link in re.findall(r"\]\(([^)]+)\)", text))
    first_lr = json.loads((folder / "lr_steps.json").read_text())["lr"]
    assert len(first_lr) == 8  # epoch 1's steps
    first_wall = record["run"]["wall_seconds"]

    # resumed: the per-step record and the wall time continue from the checkpoint
    assert main(["run", str(recipe), "--resume", str(tmp_path / "run")]) == 0
    record = json.loads((folder / "report.json").read_text())
    assert record["status"] == "completed" and record["files"] == list(rp.FILES)
    lr = json.loads((folder / "lr_steps.json").read_text())["lr"]
    assert len(lr) == 24 and lr[:8] == first_lr
    assert record["run"]["wall_seconds"] > first_wall
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # the summary counts both sessions too
    assert summary["resumed_from_epoch"] == 1
    assert "(all sessions of the run)" in capsys.readouterr().out.replace("\n", " ")  # rich wraps at spaces



def test_summary_wall_time_adds_the_earlier_sessions_kept_in_the_checkpoint(tmp_path: Path, capsys) -> None:
    from microtrain_plugins.callbacks.summary import Summary

    first = Summary()
    first.before_fit(SimpleNamespace())
    saved: dict = {"plugins": {}}
    first.on_checkpoint_save(SimpleNamespace(), saved)
    assert saved["plugins"]["summary"]["wall_seconds"] >= 0

    resumed = Summary()
    resumed.on_checkpoint_load(SimpleNamespace(), {"plugins": {"summary": {"wall_seconds": 1000.0}}})
    resumed.before_fit(SimpleNamespace())
    row = {"epoch": 2, "test_acc": 50.0, "epoch_seconds": 1.0, "train_images_per_second": 10.0,
           "per_class_acc": {"cat": 50.0}}
    state = SimpleNamespace(is_main=True, history=[dict(row, epoch=1), row], run_dir=tmp_path,
                            recipe={"name": "tiny"}, start_epoch=2)
    resumed.after_fit(state)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 1000.0 <= summary["wall_seconds"] < 1060.0 and summary["resumed_from_epoch"] == 1
    assert "wall time 16.7 min (all sessions of the run)" in capsys.readouterr().out.replace("\n", " ")

# --- evaluation plugins --------------------------------------------------------------------------

def test_report_command_evaluates_like_the_run_with_ema_and_tta(tmp_path: Path) -> None:
    from microtrain.plugin_manager import create_plugin_manager

    _, registry = create_plugin_manager()
    if not (registry.has("callback", "ema") and registry.has("callback", "tta")):
        pytest.skip("the ema/tta plugins are not installed")
    recipe = tiny_recipe(tmp_path, ["metrics", "checkpoint", "report", {"ema": {"decay": 0.9}}, "tta"], epochs=1)
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 0
    from_callback = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert main(["report", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert record["confusion"] == last_metrics(tmp_path / "run")["confusion"]
    assert record["misclassified"] == from_callback["misclassified"]


# --- tensorboard missing -------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["not installed here", "simulated"])
def test_tensorboard_missing_is_one_clear_error(tmp_path: Path, monkeypatch, capsys, how: str) -> None:
    if how == "simulated":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails as if not installed
    else:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is not None:
            pytest.skip("tensorboard is installed here")
    recipe = tiny_recipe(tmp_path, ["metrics", "tensorboard"], epochs=1)
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tensorboard" in err and "pip install 'microtrain[tensorboard]'" in err


# --- tensorboard, the real package ----------------------------------------------------------------

def test_tensorboard_events_are_readable_by_tensorboard(tmp_path: Path) -> None:
    """The real SummaryWriter's event files, read back the way ``tensorboard --logdir`` reads them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tmp_path, ["metrics", {"tensorboard": {"every_steps": 4, "mistakes": 6}}])
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "run")]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/test", "accuracy/test", "step/loss", "per_class/class0"} <= set(tags["scalars"])
    test_acc = events.Scalars("accuracy/test")
    assert [event.step for event in test_acc] == [8, 16]
    assert test_acc[-1].value == pytest.approx(last_metrics(tmp_path / "run")["test_acc"], abs=1e-4)
    assert [event.step for event in events.Scalars("step/loss")] == [4, 8, 12, 16]
    assert {"confusion", "misclassified"} <= set(tags["images"])
    confusion = events.Images("confusion")
    assert len(confusion) == 2 and confusion[-1].width > 200 and confusion[-1].height > 200
    assert confusion[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
