"""``microtrain export``: each format round-trips (written, loaded back in its own runtime by the command and again
here, and equal to microtrain.load_run's predictions: normalisation, EMA weights and flip TTA folded in), a fixed
batch, the check that deletes a file that disagrees, and bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_predict import assert_one_line_error
from trained_runs import microtrain_main

import microtrain


def run_file(fmt: str, path, images: np.ndarray) -> np.ndarray:
    """Run an exported file on uint8 NHWC images, the way a user of that runtime would."""
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["probabilities"], {"images": batch.numpy()})[0]
    model = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        return model(batch).numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
def test_each_format_round_trips_with_everything_folded_in(synthetic_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / f"model.{fmt}"
    result = microtrain_main("export", synthetic_run, "--format", fmt, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "flip TTA folded in" in result.stdout and "top-1 agreement 64/64" in result.stdout
    description = json.loads(out.with_name(out.name + ".json").read_text())
    assert description["input"]["dtype"] == "uint8" and description["input"]["shape"] == ["batch", 3, 32, 32]
    assert description["tta"] and description["weights"] == "EMA weights" and description["check"]["images"] == 64

    loaded = microtrain.load_run(synthetic_run, device="cpu")
    assert description["classes"] == loaded.classes
    images = loaded.dataset().test_images[:7]  # a batch size it was not traced with
    exported = run_file(fmt, out, images)
    expected = loaded.predict(images).numpy()  # the evaluation path: microtrain.evaluate with the tta hook
    assert exported.shape == (7, 10)
    assert np.abs(exported - expected).max() < 1e-5 and (exported.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("fmt", ["onnx", "exported-program"])
def test_a_fixed_batch(synthetic_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"fixed.{fmt}"
    result = microtrain_main("export", synthetic_run, "--format", fmt, "--out", out, "--batch", "4")
    assert result.returncode == 0, result.stderr
    assert "uint8 (4, 3, 32, 32)" in result.stdout and "top-1 agreement 4/4" in result.stdout
    images = microtrain.load_run(synthetic_run).dataset().test_images[:4]
    assert run_file(fmt, out, images).shape == (4, 10)
    with pytest.raises(Exception):  # noqa: B017 - each runtime has its own error for a wrong input shape
        run_file(fmt, out, images[:3])


def test_an_export_that_disagrees_is_deleted_and_exits_2(synthetic_run, tmp_path):
    """ONNX Runtime's float arithmetic differs from PyTorch's by ~1e-7: below a tolerance of 1e-12 that fails."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "strict.onnx"
    result = microtrain_main("export", synthetic_run, "--format", "onnx", "--out", out, "--tolerance", "1e-12")
    assert_one_line_error(result, r"the exported model disagrees with PyTorch \(check on 64 images .* max \|difference\| ")
    assert not out.exists()


def test_checked_on_given_images_when_the_dataset_is_gone(imagefolder_run, tmp_path):
    """Loading needs no dataset; the check needs real images: the test split, or --check."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(imagefolder_run.parent / "images", images)
    run_dir = tmp_path / "run"
    shutil.copytree(imagefolder_run, run_dir)
    (run_dir / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text().replace(str(imagefolder_run.parent / "images"),
                                                                                       str(tmp_path / "gone")))
    out = tmp_path / "model.pt2"
    assert_one_line_error(microtrain_main("export", run_dir, "--format", "exported-program", "--out", out),
                          r"test split could not be read .*pass --check")
    result = microtrain_main("export", run_dir, "--format", "exported-program", "--out", out, "--check", images / "test")
    assert result.returncode == 0, result.stderr
    assert "check on 24 images from --check" in result.stdout and out.is_file()


@pytest.mark.parametrize("args, pattern", [
    (["--format", "onnx", "--batch", "some"], r"--batch 'some': pass dynamic"),
    (["--format", "onnx", "--batch", "0"], r"--batch '0': pass dynamic"),
    (["--format", "torchscript", "--tolerance", "0"], r"--tolerance must be > 0"),
])
def test_bad_options_are_one_line(synthetic_run, args, pattern):
    assert_one_line_error(microtrain_main("export", synthetic_run, *args), pattern)


def test_an_unknown_format_is_a_usage_error(synthetic_run):
    result = microtrain_main("export", synthetic_run, "--format", "tflite")
    assert result.returncode == 2 and "invalid choice: 'tflite'" in result.stderr
