"""Training tricks: the ``ema`` and ``tta`` callbacks on a tiny model, and the optimizer's
weight-decay exclusion of biases and normalisation weights."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from microtrain.errors import RecipeError  # noqa: E402
from microtrain_plugins.callbacks.ema import build_ema  # noqa: E402
from microtrain_plugins.callbacks.tta import build_tta  # noqa: E402
from microtrain_plugins.optim import build_adamw, build_sgd, parameter_groups  # noqa: E402


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(model: nn.Module, generator: torch.Generator) -> None:
    """Stand-in for an optimizer step plus a training forward: new weights and new BN statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    model.train()
    model(torch.randn(8, 4, generator=generator))  # updates running_mean/var and num_batches_tracked


# --- EMA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup", [False, True])
def test_ema_two_steps_equal_a_hand_computation(warmup: bool) -> None:
    model = tiny_model()
    ema = build_ema(decay=0.9, warmup=warmup, every_steps=1, bn_batches=0)  # 0: BN statistics copied
    state = SimpleNamespace(unwrapped_model=model, step=0, eval_model=model)
    ema.before_fit(state)
    w0 = snapshot(model)
    g = torch.Generator().manual_seed(1)
    weights = []
    for _ in range(2):
        perturb(model, g)
        state.step += 1
        ema.after_batch(state)
        weights.append(snapshot(model))
    w1, w2 = weights
    d1, d2 = (min(0.9, 1 / 10), min(0.9, 2 / 11)) if warmup else (0.9, 0.9)
    averaged = ema.model.state_dict()
    param_names = {name for name, _ in model.named_parameters()}
    for name in param_names:
        expected = d2 * (d1 * w0[name] + (1 - d1) * w1[name]) + (1 - d2) * w2[name]
        assert torch.allclose(averaged[name], expected, atol=1e-6), name
    for name, _ in model.named_buffers():  # BN running stats and counters are copied, not averaged
        assert torch.equal(averaged[name], w2[name]), name
    assert int(averaged["1.num_batches_tracked"]) == 2
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert ema.model is not model


def test_ema_every_steps_skips_updates() -> None:
    model = tiny_model()
    ema = build_ema(decay=0.5, warmup=False, every_steps=2)
    state = SimpleNamespace(unwrapped_model=model, step=0, batch_index=1, steps_per_epoch=1, batch=(torch.randn(8, 4), None))
    ema.before_fit(state)
    w0 = snapshot(model)
    g = torch.Generator().manual_seed(2)
    perturb(model, g)
    state.step = 1
    ema.after_batch(state)  # step 1: no update
    assert torch.equal(ema.model.state_dict()["0.weight"], w0["0.weight"])
    perturb(model, g)
    state.step = 2
    ema.after_batch(state)
    assert torch.allclose(ema.model.state_dict()["0.weight"], 0.5 * w0["0.weight"] + 0.5 * model.state_dict()["0.weight"])
    assert ema.updates == 1


def test_ema_is_the_model_evaluated_and_survives_a_checkpoint_round_trip() -> None:
    model = tiny_model()
    ema = build_ema(decay=0.8, warmup=True)
    state = SimpleNamespace(unwrapped_model=model, step=0, eval_model=model, batch_index=1, steps_per_epoch=1,
                            batch=(torch.randn(8, 4), None))
    ema.before_fit(state)
    perturb(model, torch.Generator().manual_seed(3))
    state.step = 1
    ema.after_batch(state)
    ema.before_eval(state)
    assert state.eval_model is ema.model and state.eval_model is not model
    x = torch.randn(5, 4)
    model.eval()
    assert not torch.allclose(state.eval_model(x), model(x))  # evaluation sees the averaged weights

    checkpoint = {"plugins": {}}
    ema.on_checkpoint_save(state, checkpoint)
    saved = checkpoint["plugins"]["ema"]
    assert all(isinstance(v, torch.Tensor) for v in saved["state_dict"].values()) and saved["updates"] == 1

    fresh = build_ema(decay=0.8, warmup=True)  # a resumed run: load happens before before_fit
    other = tiny_model()
    resumed = SimpleNamespace(unwrapped_model=other, step=1, eval_model=other)
    fresh.on_checkpoint_load(resumed, checkpoint)
    fresh.before_fit(resumed)
    for name, value in ema.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], value)
    assert fresh.updates == 1 and fresh.current_decay() == ema.current_decay()


@pytest.mark.parametrize("options", [{"decay": 1.0}, {"decay": -0.1}, {"every_steps": 0}, {"bn_batches": -1},
                                     {"bn_batches": 2.5}, {"bn_batches": True}])
def test_ema_bad_options(options: dict) -> None:
    """The rules are declared with the options, so they are checked when a recipe is resolved."""
    from microtrain.plugin_manager import create_plugin_manager

    ema = create_plugin_manager()[1].get("callback", "ema", "plugins")
    with pytest.raises(RecipeError, match="plugins.ema"):
        ema.validate(options, "plugins.ema")


def run_epoch(ema, model: nn.Module, state, inputs: list[torch.Tensor], generator: torch.Generator) -> None:
    """One epoch of stand-in training steps through the hooks the engine calls."""
    state.steps_per_epoch = len(inputs)
    ema.before_epoch(state)
    for index, x in enumerate(inputs, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        model.train()
        model(x)
        state.step += 1
        state.batch_index = index
        state.batch = (x, torch.zeros(len(x), dtype=torch.long))
        ema.after_batch(state)


def test_ema_batchnorm_statistics_are_re_estimated_for_the_averaged_weights() -> None:
    """Before evaluation the averaged copy's BN running mean/var are the plain average, over the epoch's last
    bn_batches training inputs, of the batch statistics of the *averaged* weights' own activations."""
    model = tiny_model()
    ema = build_ema(decay=0.9, warmup=False, bn_batches=2)
    state = SimpleNamespace(unwrapped_model=model, step=0, batch_index=0, eval_model=model)
    ema.before_fit(state)
    g = torch.Generator().manual_seed(4)
    initial = snapshot(ema.model)
    inputs = [torch.randn(8, 4, generator=g) * (i + 1) + i for i in range(3)]
    run_epoch(ema, model, state, inputs, g)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):  # not copied from the trained model
        assert torch.equal(ema.model.state_dict()[name], initial[name]), name
    assert len(ema.recent_batches) == 2 and torch.equal(ema.recent_batches[0], inputs[1])

    ema.before_eval(state)
    assert state.eval_model is ema.model and not ema.model.training
    with torch.no_grad():
        pre_bn = [ema.model[0](x) for x in inputs[1:]]  # the first batch is not among the last two
    expected_mean = torch.stack([a.mean(0) for a in pre_bn]).mean(0)
    expected_var = torch.stack([a.var(0, unbiased=True) for a in pre_bn]).mean(0)
    bn = ema.model[1]
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-4)
    assert int(bn.num_batches_tracked) == 2 and bn.momentum == 0.1  # the layer's own momentum is restored
    assert ema.recent_batches == []
    assert not torch.allclose(bn.running_mean, model[1].running_mean)  # the trained model's would be wrong here


def test_ema_keeps_only_the_current_epochs_last_batches() -> None:
    model = tiny_model()
    ema = build_ema(decay=0.9, bn_batches=3)
    state = SimpleNamespace(unwrapped_model=model, step=0, batch_index=0, eval_model=model)
    ema.before_fit(state)
    g = torch.Generator().manual_seed(5)
    first = [torch.randn(4, 4, generator=g) for _ in range(2)]  # an epoch shorter than bn_batches: all of it
    run_epoch(ema, model, state, first, g)
    assert [torch.equal(a, b) for a, b in zip(ema.recent_batches, first, strict=True)] == [True, True]
    second = [torch.randn(4, 4, generator=g) for _ in range(5)]
    run_epoch(ema, model, state, second, g)  # before_epoch dropped the first epoch's batches
    assert len(ema.recent_batches) == 3
    assert all(torch.equal(a, b) for a, b in zip(ema.recent_batches, second[2:], strict=True))
    kept = ema.recent_batches[-1]
    second[-1].add_(100.0)  # a loader reusing its output buffer must not change what was kept
    assert not torch.equal(kept, second[-1])


# --- TTA ----------------------------------------------------------------------------------------

def tiny_conv() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.train()
    model(torch.randn(16, 3, 8, 8))  # non-trivial BN statistics
    return model.eval()


def test_tta_is_the_mean_of_the_two_forward_passes_and_flip_invariant() -> None:
    model = tiny_conv()
    tta = build_tta(flip=True)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        out = tta.predict(model=model, images=x)
        expected = (model(x) + model(x.flip(3))) / 2
        mirrored = tta.predict(model=model, images=x.flip(3))
        plain = model(x)
    assert out.shape == (6, 5)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out, mirrored, atol=1e-6)
    assert not torch.allclose(out, plain, atol=1e-4)  # the model itself is not flip-invariant


def test_tta_off_defers_to_the_plain_forward() -> None:
    assert build_tta(flip=False).predict(model=tiny_conv(), images=torch.randn(2, 3, 8, 8)) is None


# --- both in a real run -------------------------------------------------------------------------

def test_run_evaluates_ema_weights_with_flip_tta(tmp_path) -> None:
    """The logged test loss is that of the EMA weights with flip-averaged logits, not of the raw model."""
    from microtrain.checkpoint import load_checkpoint
    from microtrain.run import run
    from microtrain_plugins.data.synthetic import build_synthetic
    from microtrain_plugins.models.dsconv import build_dsconv

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "ema_tta", "epochs": 2, "threads": 1, "device": "cpu",
        "data": {"name": "synthetic", "train_size": 512, "test_size": 128},
        "model": {"name": "dsconv"},
        "loader": {"name": "albumentations", "batch_size": 32, "workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "onecycle", "max_lr": 0.4},  # learns enough to tell
        "plugins": ["metrics", "checkpoint", {"ema": {"decay": 0.9}}, "tta"],
    }))
    assert run(recipe, [], run_dir=tmp_path / "run") == 0
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")

    data = build_synthetic(train_size=512, test_size=128)
    x = torch.from_numpy(data.test_images).permute(0, 3, 1, 2).float()
    x = (x - torch.tensor(data.mean).view(1, 3, 1, 1) * 255) / (torch.tensor(data.std).view(1, 3, 1, 1) * 255)
    y = torch.from_numpy(data.test_labels)

    def loss_of(weights: dict, tta: bool) -> float:
        model = build_dsconv(10, (3, 32, 32))
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            logits = (model(x) + model(x.flip(3))) / 2 if tta else model(x)
        return F.cross_entropy(logits, y).item()

    ema_weights = checkpoint["plugins"]["ema"]["state_dict"]
    assert checkpoint["plugins"]["ema"]["updates"] == 32  # 2 epochs of 16 steps
    assert last["test_loss"] == pytest.approx(loss_of(ema_weights, tta=True), rel=1e-5)
    assert last["test_loss"] != pytest.approx(loss_of(ema_weights, tta=False), rel=1e-3)
    assert last["test_loss"] != pytest.approx(loss_of(checkpoint["model"], tta=True), rel=1e-3)


def test_ema_continues_exactly_after_resume(tmp_path) -> None:
    from microtrain.checkpoint import load_checkpoint
    from microtrain.run import run

    body = {
        "name": "ema_resume", "epochs": 2, "threads": 1, "device": "cpu",
        "data": {"name": "synthetic", "train_size": 128, "test_size": 64},
        "model": {"name": "dsconv"},
        "loader": {"name": "tensor", "batch_size": 64, "augment": [{"HorizontalFlip": {"p": 0.5}}]},
        "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "constant"},
        "plugins": ["metrics", "checkpoint", {"ema": {"decay": 0.9}}],
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(body))
    assert run(recipe, [], run_dir=tmp_path / "straight") == 0
    assert run(recipe, ["epochs=1"], run_dir=tmp_path / "split") == 0
    assert run(recipe, [], resume=tmp_path / "split", force=True) == 0  # epochs differ: needs --force
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["plugins"]["ema"]
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["plugins"]["ema"]
    assert straight["updates"] == split["updates"] == 4
    for name, value in straight["state_dict"].items():
        assert torch.allclose(split["state_dict"][name].float(), value.float(), atol=1e-6), name


# --- weight-decay exclusions ---------------------------------------------------------------------

def test_no_decay_group_holds_exactly_the_one_dimensional_params() -> None:
    from microtrain_plugins.models.dsconv import build_dsconv

    model = build_dsconv(10, (3, 32, 32))
    decay, no_decay = parameter_groups(model, 5e-4, decay_norm_and_bias=False)
    one_d = {id(p) for p in model.parameters() if p.ndim == 1}
    assert one_d  # BN weights/biases and the classifier bias
    assert {id(p) for p in no_decay["params"]} == one_d
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4

    sgd = build_sgd(model, weight_decay=5e-4, decay_norm_and_bias=False)
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-4, 0.0]
    assert {id(p) for p in sgd.param_groups[1]["params"]} == one_d
    adamw = build_adamw(model)  # AdamW excludes them by default
    assert {id(p) for p in adamw.param_groups[1]["params"]} == one_d and adamw.param_groups[1]["weight_decay"] == 0.0
    (everything,) = build_sgd(model, weight_decay=5e-4).param_groups  # SGD's default decays all
    assert everything["weight_decay"] == 5e-4 and len(everything["params"]) == len(list(model.parameters()))


def test_ema_batchnorm_benchmark_reproduces_the_logged_accuracy(tmp_path, capsys) -> None:
    """benchmarks/ema_batchnorm.py evaluates a run's checkpoint as the run did: with bn_batches=0 (statistics
    copied, the plugin's old behaviour) its 'as saved' figure is the run's logged test accuracy."""
    import importlib.util as util
    from pathlib import Path

    from microtrain.run import run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "ema_bn", "epochs": 1, "threads": 1, "device": "cpu",
        "data": {"name": "synthetic", "train_size": 256, "test_size": 64},
        "model": {"name": "dsresnet", "widths": [8, 16], "blocks": [1, 1]},
        "loader": {"name": "tensor", "batch_size": 32, "augment": [{"HorizontalFlip": {"p": 0.5}}]},
        "optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": "constant"},
        "plugins": ["metrics", "checkpoint", {"ema": {"decay": 0.9, "bn_batches": 0}}, "tta"],
    }))
    assert run(recipe, [], run_dir=tmp_path / "run") == 0
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ema_batchnorm.py"
    spec = util.spec_from_file_location("ema_batchnorm", path)
    bench = util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out.json"
    assert bench.main([str(tmp_path / "run"), "--bn-batches", "2", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ema_saved_batchnorm"] == pytest.approx(logged["test_acc"])
    assert result["ema_saved_batchnorm_test_loss"] == pytest.approx(logged["test_loss"], rel=1e-5)  # same TTA, too
    assert result["epoch"] == 1 and result["ema_updates"] == 8
    assert set(result["ema_reestimated_batchnorm"]) == {"2", "8"}
    assert all(0 <= entry["test_acc"] <= 100 for entry in result["ema_reestimated_batchnorm"].values())
    assert "re-estimated" in capsys.readouterr().out


def test_ema_batchnorm_reestimate_is_exact_after_a_mid_epoch_resume(tmp_path) -> None:
    """The batches the re-estimate keeps are not in the checkpoint; after a mid-epoch resume they are read again,
    so the logged figures equal those of an uninterrupted run. With the albumentations loader's worker process
    (the tensor loader is covered by tests/test_compatibility.py)."""
    loader = {"name": "albumentations", "workers": 1}
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    shutil.copy(REPO / "tests" / "fixtures" / "v010_run" / "stop_mid_epoch.py", tmp_path)
    body = {
        "name": "ema_mid_epoch", "epochs": 2, "seed": 1, "threads": 1, "device": "cpu",
        "data": {"name": "synthetic", "train_size": 256, "test_size": 64},
        "model": {"name": "dsresnet", "widths": [8, 16], "blocks": [1, 1]},
        "loader": {**loader, "batch_size": 32, "augment": [{"HorizontalFlip": {"p": 0.5}}]},
        "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "onecycle", "max_lr": 0.1},
        "plugins": ["metrics", "checkpoint", {"ema": {"decay": 0.9, "bn_batches": 5}}, "stop_mid_epoch"],
    }
    (tmp_path / "r.yaml").write_text(json.dumps(body))

    def microtrain(*args: str, stop_at: str = "") -> None:
        env = {**os.environ, "STOP_AT": stop_at}
        result = subprocess.run([sys.executable, "-m", "microtrain", "run", "r.yaml", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == (130 if stop_at else 0), result.stderr

    microtrain("--run-dir", "straight")
    microtrain("--run-dir", "split", stop_at="2:6")  # 8 steps per epoch: the last 5 are 4..8, two before the stop
    microtrain("--resume", "split")

    def logged(name: str) -> list[tuple]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["train_loss"], r["test_loss"], r["test_acc"]) for r in rows]

    assert logged("split") == logged("straight")
