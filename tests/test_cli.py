"""The command line as a user meets it: a real run, and one clear line (exit 2) for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO


def microtrain(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "microtrain", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env=environment, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("microtrain: error: ")
    assert "Traceback" not in result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_run_trains_and_writes_the_run_dir(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = microtrain("run", str(tiny_recipe(plugins=["progress", "metrics", "checkpoint", "summary"])), "epochs=2",
                        "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                "train_images_per_second", "per_class_acc"):
        assert key in rows[-1]
    assert set(rows[-1]["per_class_acc"]) == {f"class{i}" for i in range(10)}
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["epochs"] == 2 and saved["optimizer"]["momentum"] == 0.9
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert "mean of last 2 epochs" in result.stdout  # the summary table


def test_synthetic_run_learns(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = microtrain("run", str(tiny_recipe()), "epochs=5", "data.train_size=640", "loader.batch_size=32",
                        "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_acc"] > 80.0  # chance is 10%


def test_default_run_dir_is_runs_name_timestamp(tiny_recipe, tmp_path):
    result = microtrain("run", str(tiny_recipe()), "epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert (run_dir / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["epoch=3"], r"unknown recipe field 'epoch' \(did you mean 'epochs'\?\)"),
        (["epochs=many"], r"epochs: expected int, got str 'many'"),
        (["model.name=vgg"], r"unknown model 'vgg'; available: dsconv, dsresnet"),
        (["loader.name=albumentation"], r"unknown loader 'albumentation' \(did you mean 'albumentations'\?\)"),
        (["plugins=[not_a_module.at_all]"], r"plugin module 'not_a_module.at_all' not found"),
        (["loader.augment=[{CoarseDropout: {max_holes: 1}}]"], r"CoarseDropout has no argument 'max_holes'"),
        (["device=cuda"], r"CUDA is not available"),
    ],
)
def test_bad_input_is_one_line(tiny_recipe, tmp_path, overrides, pattern):
    assert_one_line_error(microtrain("run", str(tiny_recipe()), *overrides, "--run-dir", str(tmp_path / "r")), pattern)


def test_missing_recipe_file(tmp_path):
    assert_one_line_error(microtrain("run", str(tmp_path / "nope.yaml")), r"recipe file .*nope.yaml' not found")


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nepochs: 1\nloader: {name: albumentations, batch_size: 64]\n")
    assert_one_line_error(microtrain("run", str(path)), r"bad.yaml:3:\d+: malformed YAML")


def test_missing_required_field(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text("name: x\n")
    assert_one_line_error(microtrain("run", str(path)), r"recipe field 'epochs' is missing")


def test_missing_dataset_without_network_says_where_it_looked(tiny_recipe, tmp_path):
    empty = tmp_path / "empty"
    result = microtrain("run", str(tiny_recipe()), "data.name=cifar10", f"data.root={empty}",
                        f"data.url=file://{tmp_path}/no-such-archive.tar.gz", "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, rf"CIFAR-10 not found in '{empty}' \(looked for {empty}/cifar-10-batches-bin\)")


def test_unreadable_image_in_image_folder(tiny_recipe, tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / "a.png")
    (tmp_path / "images" / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    result = microtrain("run", str(tiny_recipe()), "data.name=imagefolder", f"data.root={tmp_path / 'images'}",
                        "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, r"unreadable image .*broken.png")


def test_unwritable_run_dir(tiny_recipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(microtrain("run", str(tiny_recipe()), "--run-dir", str(blocker / "run")), r"is not writable")


def test_plugins_lists_components_options_and_hooks():
    result = microtrain("plugins")
    assert result.returncode == 0, result.stderr
    for text in ("dsconv", "cifar10", "imagefolder", "albumentations", "sgd", "adamw", "onecycle", "cosine", "step",
                 "constant", "progress", "metrics", "checkpoint", "summary", "before_epoch", "after_batch", "on_eval",
                 "batch_size", "max_lr"):
        assert text in result.stdout, text


def test_python_dash_m_and_console_script_agree():
    import shutil

    script = shutil.which("microtrain", path=str(Path(sys.executable).parent))
    assert script, "the microtrain console script is installed beside python"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "run" in result.stdout


def test_overrides_may_follow_options():
    from microtrain.cli import _parser, parse_command_line

    args = parse_command_line(_parser(None), ["run", "r.yaml", "epochs=2", "--run-dir", "out", "seed=3", "data.name=synthetic"])
    assert args.overrides == ["epochs=2", "seed=3", "data.name=synthetic"]
    assert str(args.run_dir) == "out"


def test_stray_words_after_options_are_a_usage_error(capsys):
    from microtrain.cli import _parser, parse_command_line

    with pytest.raises(SystemExit) as exc:
        parse_command_line(_parser(None), ["run", "r.yaml", "--run-dir", "out", "stray"])
    assert exc.value.code == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err
