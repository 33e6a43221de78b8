"""The ``dali`` loader in DALI's CPU mode: sample order and sharding, determinism and resume, layout,
the affine matrix convention, clear errors (DALI missing, GPU missing, transform it cannot express),
the recipe, and a short real-data training run. Cross-loader parity is in test_loader_parity.py."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from conftest import REPO, real_cifar_root  # noqa: E402

from microtrain.cli import main  # noqa: E402
from microtrain.errors import MicrotrainError, RecipeError  # noqa: E402
from microtrain.machine import cpu_model  # noqa: E402
from microtrain.recipe import load_recipe_file  # noqa: E402
from microtrain.sampling import epoch_batches  # noqa: E402
from microtrain.state import LoaderContext  # noqa: E402
from microtrain_plugins.callbacks.metrics_log import read_metrics  # noqa: E402
from microtrain_plugins.loaders.augment_spec import canonical_transforms  # noqa: E402
from microtrain_plugins.loaders.dali_loader import affine_matrices, build_dali_loader, pipeline_inputs  # noqa: E402

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


def dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


needs_dali = pytest.mark.skipif(not dali_installed(), reason='NVIDIA DALI is not installed (pip install -e ".[dali]")')
SEED_AUGMENT = load_recipe_file(REPO / "recipes" / "cifar10_dsconv.yaml")["loader"]["augment"]


def context(images: np.ndarray, labels: np.ndarray | None = None, *, train: bool = True, seed: int = 0,
            channels_last: bool = False, rank: int = 0, world_size: int = 1) -> LoaderContext:
    if labels is None:
        labels = np.arange(len(images), dtype=np.int64)
    return LoaderContext(images=images, labels=labels, train=train, device=torch.device("cpu"), seed=seed, mean=MEAN,
                         std=STD, rank=rank, world_size=world_size, channels_last=channels_last)


def noise(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def loader(ctx: LoaderContext, **options):
    return build_dali_loader(ctx, **{"batch_size": 32, "device": "cpu", "threads": 1, **options})


def epoch(dali, number: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dali.set_epoch(number, start_batch)
    return list(dali)


# ---- order, batching, sharding -------------------------------------------------------------------

@needs_dali
@pytest.mark.parametrize("drop_last", [False, True])
def test_labels_follow_the_shared_sample_order(drop_last):
    n = 100  # 3 full batches of 32 and a partial one of 4
    dali = loader(context(noise(n)), drop_last=drop_last, augment=SEED_AUGMENT)
    for number in (1, 2):
        got = [labels.numpy() for _, labels in epoch(dali, number)]
        want = epoch_batches(n, 32, seed=0, epoch=number, shuffle=True, drop_last=drop_last)
        assert [len(g) for g in got] == [len(w) for w in want] == ([32] * 3 if drop_last else [32, 32, 32, 4])
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        assert len(dali) == len(want)


@needs_dali
def test_eval_loader_keeps_order_and_does_not_augment():
    images = noise(70)
    dali = loader(context(images, train=False), eval_batch_size=50, augment=SEED_AUGMENT)
    batches = epoch(dali, 1)
    assert [len(labels) for _, labels in batches] == [50, 20]
    labels = torch.cat([lab for _, lab in batches]).numpy()
    assert np.array_equal(labels, np.arange(70))
    pixels = torch.cat([img for img, _ in batches]).permute(0, 2, 3, 1).numpy()
    restored = np.rint((pixels * np.array(STD) + np.array(MEAN)) * 255.0)
    assert np.array_equal(restored, images)  # no augmentation on the test split


@needs_dali
def test_ranks_share_the_epoch_without_overlap():
    n = 90
    seen = []
    for rank in (0, 1):
        dali = loader(context(noise(n), rank=rank, world_size=2), batch_size=16)
        batches = epoch(dali, 1)
        assert len(batches) == len(dali) == 3  # ceil(45 / 16) on each rank
        seen.append(torch.cat([lab for _, lab in batches]).numpy())
    assert len(set(seen[0]) & set(seen[1])) == 0
    assert sorted(np.concatenate(seen)) == list(range(n))


# ---- determinism and resume --------------------------------------------------------------------

@needs_dali
def test_augmentation_depends_only_on_seed_epoch_batch():
    images = noise(96)
    first = epoch(loader(context(images), augment=SEED_AUGMENT), 1)
    again = loader(context(images), augment=SEED_AUGMENT)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(again, 1), strict=True))  # a fresh loader repeats it
    second = epoch(again, 2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    other_seed = epoch(loader(context(images, seed=1), augment=SEED_AUGMENT), 1)
    assert not torch.equal(first[0][0], other_seed[0][0])


@needs_dali
def test_resume_skips_batches_and_repeats_the_rest_exactly():
    images = noise(160)
    full = epoch(loader(context(images), augment=SEED_AUGMENT), 3)
    resumed = epoch(loader(context(images), augment=SEED_AUGMENT), 3, start_batch=2)
    assert len(resumed) == len(full) - 2
    for (a, la), (b, lb) in zip(full[2:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


@needs_dali
def test_an_abandoned_epoch_does_not_leak_into_the_next():
    images = noise(160)
    dali = loader(context(images), augment=SEED_AUGMENT)
    reference = epoch(loader(context(images), augment=SEED_AUGMENT), 2)
    dali.set_epoch(1)
    next(iter(dali))  # stop after one batch, as a run stopped early would
    again = epoch(dali, 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(reference, again, strict=True))


# ---- layout ----------------------------------------------------------------------------------------

@needs_dali
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_dtype_shape_and_memory_format(channels_last):
    images, labels = next(iter(loader(context(noise(40), channels_last=channels_last), augment=SEED_AUGMENT)))
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (32, 3, 16, 16) and images.device.type == "cpu"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert images.is_contiguous(memory_format=fmt)


# ---- GPU mode (runs only where CUDA is present) ------------------------------------------------------

@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels_last", [True, False])
def test_gpu_mode_delivers_on_the_gpu_what_cpu_mode_delivers(channels_last):
    """Same batches, labels and layout from GPU operators as from CPU operators; pixels may differ only
    by interpolation rounding in the warped images."""
    images = noise(200, size=32)
    cpu = loader(context(images, channels_last=channels_last), augment=SEED_AUGMENT)
    gpu_ctx = context(images, channels_last=channels_last)
    gpu_ctx.device = torch.device("cuda", torch.cuda.current_device())
    gpu = build_dali_loader(gpu_ctx, batch_size=32, device="gpu", augment=SEED_AUGMENT)
    for number in (1, 2):
        for (xc, yc), (xg, yg) in zip(epoch(cpu, number), epoch(gpu, number), strict=True):
            assert xg.device.type == "cuda" and yg.device.type == "cuda" and xg.dtype == torch.float32
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert xg.is_contiguous(memory_format=fmt)
            assert torch.equal(yg.cpu(), yc)
            diff = ((xg.cpu() - xc) * torch.tensor(STD).view(1, 3, 1, 1) * 255.0).abs()
            assert diff.max() <= 1.01 and (diff > 0.01).float().mean() < 0.05


# ---- the random parameters -------------------------------------------------------------------------

def test_affine_matrix_is_the_inverse_of_albumentations_transform():
    """Same forward transform as albumentations' Affine, inverted and moved to DALI's pixel grid."""
    from albumentations.augmentations.geometric.functional import center, create_affine_transformation_matrix

    height, width = 24, 32
    tx, ty, scale, angle = np.array([3.0, -2.0]), np.array([-1.0, 4.0]), np.array([0.9, 1.2]), np.array([17.0, -40.0])
    ours = affine_matrices(tx, ty, scale, angle, height, width)
    to_dali = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])  # pixel centres: cv2 at k, DALI at k + 0.5
    for i in range(2):
        forward = create_affine_transformation_matrix({"x": tx[i], "y": ty[i]}, {"x": 0.0, "y": 0.0},
                                                      {"x": scale[i], "y": scale[i]}, angle[i], center((height, width)))
        expected = to_dali @ np.linalg.inv(forward) @ np.linalg.inv(to_dali)
        np.testing.assert_allclose(ours[i], expected[:2], atol=1e-5)


def test_dropout_holes_are_drawn_like_albumentations():
    """Pixel ranges (upper bound >= 1) include both ends; fractions (0, 1) scale the image side."""
    entries = [{"CoarseDropout": {"num_holes_range": [1, 3], "hole_height_range": [2, 5], "hole_width_range": [3, 3],
                                  "p": 1.0}},
               {"CoarseDropout": {"num_holes_range": [2, 2], "hole_height_range": [0.25, 0.5],
                                  "hole_width_range": [0.1, 0.1], "p": 0.0}}]
    anchors, shapes, anchors2, shapes2 = pipeline_inputs(canonical_transforms(entries, "dali"), 500, 20, 40,
                                                         np.random.default_rng(0))
    h, w = shapes[:, 0::2], shapes[:, 1::2]
    used = h > 0
    assert sorted(np.unique(used.sum(1))) == [1, 2, 3]
    assert set(np.unique(h[used])) == {2, 3, 4, 5} and set(np.unique(w[used])) == {3}
    assert (anchors[:, 0::2] + h <= 20).all() and (anchors[:, 1::2] + w <= 40).all() and (anchors >= 0).all()
    assert (shapes2 == 0).all()  # p=0: every hole has size 0, the image is left alone
    always = canonical_transforms([{"CoarseDropout": {**entries[1]["CoarseDropout"], "p": 1.0}}], "dali")
    sides = pipeline_inputs(always, 500, 20, 40, np.random.default_rng(1))[1]
    assert set(np.unique(sides[:, 0::2])) <= set(range(5, 11)) and set(np.unique(sides[:, 1::2])) == {4}


# ---- errors ----------------------------------------------------------------------------------------

def test_missing_dali_is_one_line_with_the_install_command(monkeypatch, tiny_recipe, capsys):
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    recipe = tiny_recipe(loader={"name": "dali", "batch_size": 64})
    assert main(["run", str(recipe), "epochs=1", "--run-dir", str(recipe.parent / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "loader 'dali' needs NVIDIA DALI" in err and 'pip install -e ".[dali]"' in err


@needs_dali
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_gpu_requested_without_a_gpu_says_so():
    with pytest.raises(MicrotrainError, match="loader.device=gpu but no CUDA GPU is available here; use loader.device=cpu"):
        build_dali_loader(context(noise(8)), device="gpu")


@needs_dali
def test_a_transform_dali_cannot_express_is_named():
    with pytest.raises(RecipeError, match=r"transform 'Blur' cannot be expressed by the dali loader"):
        loader(context(noise(8)), augment=[{"HorizontalFlip": {"p": 0.5}}, {"Blur": {"p": 0.5}}])
    with pytest.raises(RecipeError, match=r"Affine.shear cannot be expressed by the dali loader"):
        loader(context(noise(8)), augment=[{"Affine": {"shear": [-5, 5]}}])


@pytest.mark.parametrize("option, value, match", [
    ("batch_size", 0, "loader.batch_size: must be >= 1, got 0"),
    ("threads", -1, "loader.threads: must be >= 0, got -1"),
    ("prefetch", 0, "loader.prefetch: must be >= 1, got 0"),
    ("augment", [{"Blur": {"p": 0.5}}], r"loader.augment\[0\]: transform 'Blur' cannot be expressed by the dali loader"),
])
def test_bad_options_are_refused_when_the_recipe_is_resolved(option, value, match):
    """No DALI needed: the resolver checks the options before anything is built."""
    from microtrain.plugin_manager import create_plugin_manager

    component = create_plugin_manager()[1].get("loader", "dali", "loader.name")
    with pytest.raises(RecipeError, match=match):
        component.validate({option: value}, "loader")


# ---- the recipe and a real run ---------------------------------------------------------------------

def test_dali_recipe_is_the_seed_recipe_with_another_loader():
    seed = load_recipe_file(REPO / "recipes" / "cifar10_dsconv.yaml")
    dali = load_recipe_file(REPO / "recipes" / "cifar10_dsconv_dali.yaml")
    assert dali["loader"]["name"] == "dali"
    assert dali["loader"]["augment"] == seed["loader"]["augment"]
    assert dali["loader"]["batch_size"] == seed["loader"]["batch_size"]
    assert {k: v for k, v in dali.items() if k not in ("name", "loader")} == {k: v for k, v in seed.items()
                                                                           if k not in ("name", "loader")}


@pytest.mark.slow
@needs_dali
def test_short_cpu_training_run_learns(tmp_path):
    """3 epochs on 2,000 real CIFAR-10 training images, judged on 500 test images (chance is 10%)."""
    root = real_cifar_root()
    if root is None:
        pytest.skip("CIFAR-10 copy not found (set MICROTRAIN_DATA)")
    recipe = yaml.safe_load((REPO / "recipes" / "cifar10_dsconv_dali.yaml").read_text())
    recipe.update(epochs=3, threads=1, plugins=["metrics"])
    recipe["data"] = {"name": "cifar10", "root": str(root), "limit_train": 2000, "limit_test": 500, "verify": False}
    recipe["loader"].update(device="cpu", threads=1, batch_size=64, eval_batch_size=250)
    path = tmp_path / "dali.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    accuracy = [row["test_acc"] for row in read_metrics(tmp_path / "run")]
    assert len(accuracy) == 3
    assert accuracy[-1] > 20.0, accuracy


# ---- the throughput benchmark ----------------------------------------------------------------------

@needs_dali
def test_throughput_benchmark_runs_and_writes_json(tmp_path, capsys, monkeypatch):
    """A tiny run of benchmarks/loader_throughput.py: every asked-for variant measured, JSON written."""
    import importlib.util as util
    import json

    spec = util.spec_from_file_location("loader_throughput", REPO / "benchmarks" / "loader_throughput.py")
    bench = util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "cifar_roots", lambda _root: [])  # synthetic images of CIFAR-10's shape: no file reading
    out = tmp_path / "throughput.json"
    assert bench.main(["--loaders", "albumentations,dali", "--workers", "0", "--limit", "300", "--batch-size", "64",
                       "--warmup", "0", "--epochs", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["loader"], r["setting"]): r for r in report["results"]}
    assert set(rows) == {("albumentations", "workers=0"), ("dali", "device=cpu")}
    for row in rows.values():
        assert row["status"] == "ok" and row["images_per_epoch"] == 300 and row["batches_per_epoch"] == 5
        assert len(row["epoch_seconds"]) == 2 and row["images_per_second"] > 0
    assert report["settings"]["images"] == 300 and report["settings"]["data"].startswith("synthetic 32x32x3")
    assert "load_average_at_start" in report["machine"]
    assert report["machine"]["cpu"] == cpu_model() and report["machine"]["torch_threads"] >= 1  # the CPU's model, not "x86_64"
    assert "Loader throughput" in capsys.readouterr().out


def test_throughput_benchmark_takes_an_augment_list(tmp_path, capsys, monkeypatch):
    """--augment with a YAML list: the tensor loader measures it, a loader that cannot run it is skipped with why."""
    import importlib.util as util
    import json

    spec = util.spec_from_file_location("loader_throughput", REPO / "benchmarks" / "loader_throughput.py")
    bench = util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "cifar_roots", lambda _root: [])
    out = tmp_path / "throughput.json"
    common = ["--workers", "0", "--limit", "128", "--batch-size", "64", "--warmup", "0", "--epochs", "1"]
    assert bench.main(["--loaders", "tensor,albumentations", "--augment", "[HorizontalFlip, {TrivialAugment: {}}]",
                       *common, "--json", str(out)]) == 0
    rows = {r["loader"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["tensor"]["status"] == "ok" and rows["tensor"]["images_per_epoch"] == 128
    assert rows["albumentations"]["status"] == "skipped" and "tensor-loader transform" in rows["albumentations"]["reason"]
    capsys.readouterr()
    assert bench.main(["--loaders", "tensor", "--augment", "{HorizontalFlip: 1}", *common]) == 2
    assert "give seed, none or a YAML list" in capsys.readouterr().err
