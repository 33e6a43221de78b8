"""Datasets: the CIFAR-10 binary reader (no unpickling), checksums, image folders, and a short
real-data check on the CIFAR-10 copy when it is present."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import real_cifar_root

from microtrain.errors import DataError
from microtrain_plugins.data import cifar10
from microtrain_plugins.data.imagefolder import build_imagefolder


def write_batches(folder, count=20, seed=0):
    """Tiny CIFAR-10 binary batches: label byte + R, G, B planes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    images = {}
    for name in [*cifar10.TRAIN_FILES, cifar10.TEST_FILE]:
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        pixels = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], pixels.reshape(count, -1)], axis=1)
        (folder / name).write_bytes(records.tobytes())
        images[name] = (labels, pixels)
    return images


def test_reads_binary_batches_in_hwc_order(tmp_path):
    written = write_batches(tmp_path / "cifar-10-batches-bin")
    data = cifar10.build_cifar10(root=str(tmp_path), verify=False, download_missing=False)
    assert data.train_images.shape == (100, 32, 32, 3) and data.train_images.dtype == np.uint8
    labels, pixels = written["data_batch_1.bin"]
    assert np.array_equal(data.train_labels[:20], labels.astype(np.int64))
    assert np.array_equal(data.train_images[0, :, :, 0], pixels[0, 0])  # red plane
    assert np.array_equal(data.train_images[3, 5, 7], pixels[3, :, 5, 7])
    assert data.classes[0] == "airplane" and len(data.test_labels) == 20


def test_root_may_be_the_batches_folder_itself_and_env_var_works(tmp_path, monkeypatch):
    write_batches(tmp_path / "cifar-10-batches-bin")
    assert cifar10.build_cifar10(root=str(tmp_path / "cifar-10-batches-bin"), verify=False).num_classes == 10
    monkeypatch.setenv("MICROTRAIN_DATA", str(tmp_path))
    assert len(cifar10.build_cifar10(verify=False).train_labels) == 100


def test_checksum_mismatch_is_reported(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-bin")
    with pytest.raises(DataError, match="checksum mismatch for .*data_batch_1.bin"):
        cifar10.build_cifar10(root=str(tmp_path))


def test_truncated_batch_is_reported(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_batches(folder)
    (folder / "test_batch.bin").write_bytes(b"\x01" * 1000)
    with pytest.raises(DataError, match="truncated or not a CIFAR-10 binary batch"):
        cifar10.build_cifar10(root=str(tmp_path), verify=False)


def test_missing_data_without_download_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=f"looked for {tmp_path}/cifar-10-batches-bin"):
        cifar10.build_cifar10(root=str(tmp_path), download_missing=False)


def make_folder(root, size=(8, 8)):
    from PIL import Image

    for split, count in (("train", 3), ("test", 2)):
        for index, cls in enumerate(("zebra", "ant")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", size, (index * 200, i * 10, 50 + index)).save(folder / f"{i}.png")


def test_imagefolder_classes_sorted_by_folder_name(tmp_path):
    make_folder(tmp_path)
    data = build_imagefolder(root=str(tmp_path))
    assert data.classes == ["ant", "zebra"]
    assert data.train_images.shape == (6, 8, 8, 3)
    assert sorted(data.train_labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.train_images[data.train_labels == 1][0, 0, 0, 0] == 0  # zebra was drawn with red 0
    assert build_imagefolder(root=str(tmp_path), image_size=16).test_images.shape == (4, 16, 16, 3)


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    from PIL import Image

    make_folder(tmp_path)
    Image.new("RGB", (9, 9)).save(tmp_path / "train" / "ant" / "odd.png")
    with pytest.raises(DataError, match="set data.image_size=N"):
        build_imagefolder(root=str(tmp_path))


@pytest.mark.parametrize("contents", [[], ["notes.txt", ".hidden.png"]], ids=["empty", "no images"])
def test_imagefolder_refuses_a_class_folder_without_images(tmp_path, contents):
    """It would be a class the model is never shown (issue 16: a phantom class)."""
    from microtrain_plugins.data.imagefolder import build_imagefolder

    make_folder(tmp_path)
    phantom = tmp_path / "train" / "bee"
    phantom.mkdir()
    for name in contents:
        (phantom / name).write_text("x")
    for build in (build_imagefolder, build_imagefolder.describe):  # training and `microtrain inspect`
        with pytest.raises(DataError, match=rf"class folder {phantom} has no .png/.jpg/.jpeg image.*remove the folder"):
            build(root=str(tmp_path))


@pytest.mark.parametrize("red_and_green_vary, channel", [(True, "blue"), (False, "red")],
                         ids=["one constant channel", "blank images"])
def test_imagefolder_refuses_a_channel_with_the_same_value_in_every_image(tmp_path, red_and_green_vary, channel):
    """Its std is 0 and normalising divides by it: NaN from the first batch (issue 16). Blue is 33 in every image,
    a level whose variance comes out negative in floating point, hence NaN rather than 0 before the fix."""
    from PIL import Image

    for split in ("train", "test"):
        for index, cls in enumerate(("ant", "zebra")):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                level = 10 + (2 * index + i) * 30 if red_and_green_vary else 33
                Image.new("RGB", (8, 8), (level, level, 33)).save(folder / f"{i}.png")
    with pytest.raises(DataError, match=rf"the {channel} channel has the same value in every training image under "
                                        rf"{tmp_path / 'train'} \(std 0\).*blank or one colour"):
        build_imagefolder(root=str(tmp_path))


@pytest.mark.parametrize("level", [33, 50, 255])
def test_channel_statistics_of_a_constant_channel_are_zero_not_nan(level):
    images = np.full((1000, 4, 4, 3), level, dtype=np.uint8)
    mean, std = cifar10.channel_stats(images)
    assert std == (0.0, 0.0, 0.0) and mean == pytest.approx((level / 255,) * 3, abs=1e-4)


def test_a_run_on_an_image_folder_with_a_phantom_class_stops_in_one_line(tiny_recipe, tmp_path, capsys):
    """The data is read before anything is written, so no run dir is left behind (let alone one 'running')."""
    from microtrain.cli import main

    make_folder(tmp_path / "images")
    (tmp_path / "images" / "train" / "bee").mkdir()
    run_dir = tmp_path / "run"
    assert main(["run", str(tiny_recipe()), "data.name=imagefolder", f"data.root={tmp_path / 'images'}",
                 "--run-dir", str(run_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microtrain: error: imagefolder: class folder ") and "bee" in lines[0]
    assert not run_dir.exists()


@pytest.mark.skipif(real_cifar_root() is None, reason="the CIFAR-10 copy (../shared/data) is not present")
def test_real_cifar10_copy_verifies_and_has_the_seed_statistics():
    data = cifar10.build_cifar10(root=str(real_cifar_root()), download_missing=False)
    assert data.train_images.shape == (50000, 32, 32, 3) and data.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    assert data.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-4)
    assert data.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=1e-3)


@pytest.mark.skipif(real_cifar_root() is None, reason="the CIFAR-10 copy (../shared/data) is not present")
def test_short_real_data_run_learns(tiny_recipe, tmp_path):
    """2 epochs on 2,000 real images with the seed recipe's loader: clearly above chance."""
    from conftest import REPO

    from microtrain.run import run

    run_dir = tmp_path / "run"
    status = run(REPO / "recipes" / "cifar10_dsconv.yaml",
                 [f"data.root={real_cifar_root()}", "data.limit_train=2000", "data.limit_test=500", "epochs=2",
                  "loader.batch_size=64", "plugins=[metrics]"], run_dir=run_dir)
    assert status == 0
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_acc"] > 20.0
