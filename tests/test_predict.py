"""``microtrain predict`` (once as the console script, otherwise its main() in this process): the test split of
a finished run scores the run's logged test accuracy exactly (an image folder of mixed gray / RGBA / palette
files of another size, and a CIFAR-10 binary batch); JSON lines; unlabelled inputs; and every bad input is one
line and exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from trained_runs import (
    copy_with_another_model,
    logged_test_acc,
    microtrain_cli,
    microtrain_main,
    )

from microtrain_plugins.data import cifar10


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_line_error(result, pattern: str) -> None:
    import re

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microtrain: error:"), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stderr


def test_an_image_folder_test_split_scores_the_logged_accuracy(imagefolder_run, tmp_path):
    test_split = imagefolder_run.parent / "images" / "test"
    out = tmp_path / "predictions.jsonl"
    result = microtrain_cli("predict", imagefolder_run, test_split, "--json", out, "--top-k", "2")  # the console script
    assert result.returncode == 0, result.stderr
    logged = logged_test_acc(imagefolder_run)
    assert f"accuracy {logged:.2f}%" in result.stdout and "EMA weights, flip TTA" in result.stdout
    rows = json_lines(out)
    assert len(rows) == 24 and {"path", "class", "probability", "top_k", "label"} <= set(rows[0])
    assert len(rows[0]["top_k"]) == 2 and rows[0]["top_k"][0] == [rows[0]["class"], rows[0]["probability"]]
    correct = sum(row["class"] == row["label"] for row in rows)
    assert 100.0 * correct / len(rows) == logged  # exactly: gray, RGBA and palette files converted as training did
    assert all(Path(row["path"]).parent.name == row["label"] for row in rows)
    for name in ("kind0", "kind1", "kind2"):  # the per-class table
        assert name in result.stdout


def test_a_cifar10_binary_batch_scores_the_logged_accuracy(cifar_run, tmp_path):
    batch = cifar_run.parent / "data" / cifar10.FOLDER / cifar10.TEST_FILE
    out = tmp_path / "cifar.jsonl"
    result = microtrain_main("predict", cifar_run, batch, "--json", out, "--rows", "3")
    assert result.returncode == 0, result.stderr
    assert f"accuracy {logged_test_acc(cifar_run):.2f}%" in result.stdout
    assert "57 more images" in result.stdout
    rows = json_lines(out)
    assert rows[5]["path"] == f"{batch}[5]" and 100.0 * sum(r["class"] == r["label"] for r in rows) / 60 == logged_test_acc(cifar_run)


def test_files_and_unlabelled_folders_are_predicted_without_a_score(imagefolder_run, tmp_path):
    from PIL import Image

    loose = tmp_path / "loose"
    (loose / "holiday").mkdir(parents=True)
    source = sorted((imagefolder_run.parent / "images" / "test" / "kind1").glob("*.png"))
    for i, path in enumerate(source[:3]):
        shutil.copy(path, loose / "holiday" / f"{i}.png")
    single = tmp_path / "single.jpg"
    Image.open(source[0]).convert("RGB").save(single)
    out = tmp_path / "loose.jsonl"
    result = microtrain_main("predict", imagefolder_run, loose, single, "--json", out, "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert "accuracy" not in result.stdout
    rows = json_lines(out)
    assert [Path(r["path"]).name for r in rows] == ["0.png", "1.png", "2.png", "single.jpg"]
    assert all("label" not in r for r in rows)
    for row in rows:  # three classes of three: the whole distribution, best first
        probabilities = [p for _, p in row["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1.0) < 1e-5


def test_a_folder_with_some_unknown_class_folders_is_not_scored_and_says_why(imagefolder_run, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(imagefolder_run.parent / "images" / "test" / "kind0", mixed / "kind0")
    shutil.copytree(imagefolder_run.parent / "images" / "test" / "kind1", mixed / "kind9")
    result = microtrain_main("predict", imagefolder_run, mixed)
    assert result.returncode == 0, result.stderr
    assert "not scored" in result.stdout and "kind9" in result.stdout and "accuracy" not in result.stdout


def test_raw_weights_differ_from_ema(synthetic_run, tmp_path):
    rows = {}
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    import microtrain

    data = microtrain.load_run(synthetic_run).dataset()
    for i in range(6):
        Image.fromarray(data.test_images[i]).save(images / f"{i}.png")
    for flag in ([], ["--raw"]):
        out = tmp_path / f"p{len(flag)}.jsonl"
        result = microtrain_main("predict", synthetic_run, images, "--json", out, *flag)
        assert result.returncode == 0, result.stderr
        assert ("trained weights (--raw)" if flag else "EMA weights") in result.stdout
        rows[bool(flag)] = [r["top_k"] for r in json_lines(out)]
    assert rows[True] != rows[False]


@pytest.mark.parametrize("make, pattern", [
    (lambda tmp: _write(tmp / "notes.txt", b"shopping list"), r"'.*notes.txt' is not an image .*pass PNG or JPEG"),
    (lambda tmp: _write(tmp / "broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40), r"unreadable image '.*broken.png'"),
    (lambda tmp: _truncated_png(tmp), r"unreadable image '.*cut.png'"),
    (lambda tmp: tmp / "missing.png", r"input '.*missing.png' not found"),
    (lambda tmp: _write(tmp / "bad.bin", b"\x01" * 1000), r"truncated or not a CIFAR-10 binary batch"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", r"no PNG or JPEG images under"),
])
def test_bad_inputs_are_one_line_and_exit_2(synthetic_run, tmp_path, make, pattern):
    assert_one_line_error(microtrain_main("predict", synthetic_run, make(tmp_path)), pattern)


def test_a_missing_run_dir_is_one_line(tmp_path):
    image = _write(tmp_path / "x.png", b"")
    assert_one_line_error(microtrain_main("predict", tmp_path / "no_run", image), r"run dir or checkpoint .* not found")


def test_a_checkpoint_of_another_model_is_one_line(synthetic_run, tmp_path):
    other = copy_with_another_model(synthetic_run, tmp_path / "other")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert_one_line_error(microtrain_main("predict", other, image), r"does not belong to the run .* does not fit")


def test_bad_options_are_one_line(synthetic_run, tmp_path):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert_one_line_error(microtrain_main("predict", synthetic_run, image, "--top-k", "0"), "--top-k must be at least 1")
    assert_one_line_error(microtrain_main("predict", synthetic_run, image, "--device", "tpu"), "not a device")


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _truncated_png(tmp: Path) -> Path:
    from PIL import Image

    path = tmp / "cut.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:300])
    return path
