"""Loading a finished run to use what it trained: :func:`load_run`.

    run = microtrain.load_run("runs/cifar10_dsconv/<stamp>")       # or a checkpoint file in its checkpoints/
    probabilities = run.predict([Image.open("cat.png")])          # (N, classes), rows sum to 1
    print(run.classes[int(probabilities[0].argmax())])

The run is assembled with :func:`microtrain.build_run` from the run dir's ``recipe.yaml`` and the checkpoint,
with the callbacks that take part in evaluation, so the model is the one the run evaluated: its EMA weights
when it used ``ema`` (``raw=True``: the trained weights), test-time augmentation through the ``predict`` hook
when it used ``tta``, the recipe's precision. Predictions go through :func:`microtrain.evaluate`, the loop that
logged the run's test accuracy, so the test split predicted from a checkpoint scores what the run logged for it.

The dataset is not read when the checkpoint records its statistics (``checkpoint["data"]``: mean, std, image
shape; every checkpoint written since they were added): the run is built with a stand-in dataset holding those
and blank images, so loading takes seconds and needs neither the data nor the time to read it. A checkpoint
written before has none; then the recipe's dataset is built once, as training built it, for its statistics.

Preprocessing is the test split's path: each image is converted as the image-folder dataset converts its files
(PIL ``convert("RGB")``: gray replicated, alpha dropped, palette expanded; ``"L"`` for a 1-channel model),
resized to the trained size with bilinear filtering when its size differs (the dataset's ``image_size``
resize), then normalised with the run's mean and std exactly as the loaders do it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microtrain.assembly import Run, build_run, prepare_recipe
from microtrain.checkpoint import load_checkpoint
from microtrain.engine import evaluate
from microtrain.errors import CheckpointError, DataError, MicrotrainError
from microtrain.plugin_manager import call_hook
from microtrain.state import ImageData

LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
DEFAULT_BATCH_SIZE = 256  # when the run's test loader does not say its batch size


def find_run(path: str | Path) -> tuple[Path, Path]:
    """``(run dir, checkpoint)`` for a run dir (its ``checkpoints/last.pt``) or a checkpoint file inside one."""
    path = Path(path).expanduser()
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        checkpoint = path
    elif path.is_dir():
        run_dir, checkpoint = path, path / LAST_CHECKPOINT
    else:
        raise MicrotrainError(f"run dir or checkpoint '{path}' not found; pass a run dir (runs/<name>/<stamp>) or a "
                              "checkpoint file in its checkpoints/ folder")
    if not (run_dir / "recipe.yaml").is_file():
        raise MicrotrainError(f"'{run_dir}' has no recipe.yaml; pass the run dir of a microtrain run, or a checkpoint "
                              "file in its checkpoints/ folder")
    if not checkpoint.is_file():
        raise CheckpointError(f"'{run_dir}' has no {LAST_CHECKPOINT} (the run wrote no checkpoint yet, or the "
                              "'checkpoint' plugin was off); pass another checkpoint file of the run")
    return run_dir, checkpoint


def stand_in_data(classes: Sequence[str], recorded: dict[str, Any], batch_size: int) -> ImageData:
    """A dataset with the run's classes, image shape and statistics, and blank images.

    build_run makes loaders, an optimizer and a schedule over it, and a schedule may need the run's epoch length
    (onecycle refuses fewer than 4 steps), so its training split has the run's size (``train_size``; two batches
    for a checkpoint without it): np.zeros, whose pages are not touched until a loader copies them."""
    channels, height, width = (int(v) for v in recorded["image_shape"])
    count = int(recorded.get("train_size") or 2 * max(batch_size, len(classes), 1))
    images = np.zeros((count, height, width, channels), dtype=np.uint8)
    labels = np.arange(count, dtype=np.int64) % len(classes)
    return ImageData(images, labels, images[: len(classes)], labels[: len(classes)], list(classes),
                     tuple(float(v) for v in recorded["mean"]), tuple(float(v) for v in recorded["std"]))


def _recorded_data(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    recorded = checkpoint.get("data")
    if isinstance(recorded, dict) and {"mean", "std", "image_shape"} <= set(recorded) and checkpoint.get("classes"):
        return recorded
    return None


@dataclass
class LoadedRun:
    """A run's evaluation model with its classes and preprocessing; made by :func:`load_run`."""

    run: Run  # the assembled run; without the dataset (``from_recorded_data``) its loaders hold blank images
    model: torch.nn.Module  # in eval mode: the EMA weights when the run used ema, unless loaded with raw=True
    classes: list[str]
    recipe: dict[str, Any]  # the resolved recipe, as the run dir saved it (with the load's overrides)
    image_shape: tuple[int, int, int]  # (channels, height, width) the model was trained on
    mean: tuple[float, ...]  # per channel, in [0, 1]
    std: tuple[float, ...]
    checkpoint_path: Path
    epoch: int  # the checkpoint's last finished epoch
    raw: bool
    batch_size: int  # the run's test batch size: predicting the test split batches it as evaluation did
    from_recorded_data: bool  # True when built from the checkpoint's statistics, without reading the dataset
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics up to the checkpoint
    _dataset: ImageData | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.run.state.device

    @property
    def logged_metrics(self) -> dict[str, Any] | None:
        """The metrics the run logged for the checkpoint's epoch (None for a checkpoint without them)."""
        return next((row for row in reversed(self.history) if row.get("epoch") == self.epoch), None)

    # -- preprocessing --------------------------------------------------------------------------------------
    def to_arrays(self, images: Any) -> np.ndarray:
        """Images as the dataset holds them: uint8 ``(N, H, W, C)`` at the trained size and channel count.

        ``images``: a PIL image, a uint8 array (H, W), (H, W, C) or (N, H, W, C), or a sequence of those."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return np.stack([self._as_trained(image) for image in images]) if len(images) else self._empty()
        if not isinstance(images, (list, tuple)):
            images = [images]
        return np.stack([self._as_trained(image) for image in images]) if images else self._empty()

    def normalise(self, arrays: np.ndarray) -> torch.Tensor:
        """uint8 ``(N, H, W, C)`` -> the float32 NCHW batch on the device that the test loader would make of it
        (the same operations in the same order, so the same bits)."""
        device = self.device
        channels = self.image_shape[0]
        mean = torch.tensor(self.mean, device=device).view(1, channels, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(self.std, device=device).view(1, channels, 1, 1) * 255.0)
        images = torch.from_numpy(np.ascontiguousarray(arrays)).to(device).permute(0, 3, 1, 2).float()
        images = (images - mean) * inv_std
        fmt = torch.channels_last if self.recipe.get("channels_last") else torch.contiguous_format
        return images.contiguous(memory_format=fmt)

    def preprocess(self, images: Any) -> torch.Tensor:
        """PIL images or uint8 arrays -> the normalised float32 batch ``(N, C, H, W)`` the model takes."""
        return self.normalise(self.to_arrays(images))

    def _empty(self) -> np.ndarray:
        channels, height, width = self.image_shape
        return np.zeros((0, height, width, channels), dtype=np.uint8)

    def _as_trained(self, image: Any) -> np.ndarray:
        from PIL import Image

        channels, height, width = self.image_shape
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise DataError(f"an image array is {image.dtype}; pass uint8 pixels (0-255), (H, W) or (H, W, C)")
            if image.shape == (height, width, channels):
                return image  # what PIL's conversion and the resize would leave unchanged
            if image.ndim == 3 and image.shape[2] == 1:
                image = image[:, :, 0]
            if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
                raise DataError(f"an image array has shape {image.shape}; pass (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise DataError(f"cannot read a {type(image).__name__} as an image; pass PIL images or uint8 arrays")
        if channels not in (1, 3):
            raise DataError(f"the model takes {channels}-channel images; pass uint8 arrays (H, W, {channels})")
        image = image.convert("RGB" if channels == 3 else "L")
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array

    # -- prediction -----------------------------------------------------------------------------------------
    def logits_of_batches(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Float32 logits (on the CPU) of preprocessed batches, through microtrain.evaluate: the recipe's precision,
        the predict hook (test-time augmentation) and the evaluation model, as when the run logged its accuracy."""
        collected: list[torch.Tensor] = []

        def labelled(batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for images in batches:  # evaluate scores its batches against labels; these are unknown, and not used
                yield images, torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)

        evaluate(self.run.state, self.model, loader=labelled(batches), prefix="predict", all_ranks=False,
                 collect=lambda images, labels, logits: collected.append(logits.cpu()))
        return torch.cat(collected) if collected else torch.zeros(0, len(self.classes))

    def predict(self, images: Any, *, batch_size: int | None = None) -> torch.Tensor:
        """Class probabilities ``(N, classes)`` (float32, on the CPU) of PIL images or uint8 arrays (see
        :meth:`to_arrays`), in batches of ``batch_size`` (default: the run's test batch size)."""
        arrays = self.to_arrays(images)
        size = batch_size or self.batch_size
        batches = (self.normalise(arrays[start:start + size]) for start in range(0, len(arrays), size))
        return self.logits_of_batches(batches).softmax(dim=1)

    def inference_module(self) -> torch.nn.Module:
        """One module from uint8 images ``(N, C, H, W)`` at the trained size to class probabilities, for export: the
        run's normalisation, its evaluation model, the predict hook (the tta flip average) and a softmax. It runs
        in float32 whatever the recipe's precision."""
        return InferenceModule(self)

    # -- the run's own data ---------------------------------------------------------------------------------
    def dataset(self) -> ImageData:
        """The run's dataset, built from its recipe (read once, on first use, when the run was loaded without it)."""
        if not self.from_recorded_data:
            return self.run.state.data
        if self._dataset is None:
            options = dict(self.recipe["data"])
            component = self.run.registry.get("data", options.pop("name"), "data.name")
            self._dataset = component.build(options=options)
        return self._dataset


class InferenceModule(torch.nn.Module):
    """uint8 ``(N, C, H, W)`` -> probabilities; see :meth:`LoadedRun.inference_module`."""

    def __init__(self, loaded: LoadedRun):
        super().__init__()
        channels = loaded.image_shape[0]
        self.model = loaded.model
        # As the loaders compute them (float32 statistics scaled to 0-255), so the normalised pixels are the same.
        self.register_buffer("mean", torch.tensor(loaded.mean).view(1, channels, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(loaded.std).view(1, channels, 1, 1) * 255.0))
        self._state = loaded.run.state

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = (images.float() - self.mean) * self.inv_std
        state = self._state
        # evaluate's forward: the first plugin's predict result (test-time augmentation), else the plain model
        logits = call_hook(state.plugin_manager, "predict", state=state, model=self.model, images=images)
        if logits is None:
            logits = self.model(images)
        return logits.float().softmax(dim=1)


def load_run(path: str | Path, *, raw: bool = False, device: str | None = None, overrides: Iterable[str] = ()) -> LoadedRun:
    """Load a run dir (its ``checkpoints/last.pt``) or one of its checkpoint files for prediction.

    ``raw``: the trained weights instead of the EMA ones (test-time augmentation still applies, as in evaluation).
    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (default: the recipe's). ``overrides``: dotted recipe
    overrides, as on the command line (``data.root=/data`` where an old checkpoint's dataset moved).
    Never executes code from the files: the checkpoint is read with ``torch.load(weights_only=True)``."""
    run_dir, checkpoint_path = find_run(path)
    checkpoint = load_checkpoint(checkpoint_path)
    overrides = [*overrides, *([f"device={device}"] if device else [])]
    # We evaluate, never resume: a mid-epoch checkpoint's position within its epoch does not apply (the stand-in
    # data's epoch is not the run's length).
    checkpoint = {**checkpoint, "batch_index": 0, "epoch_totals": {}}
    recipe, _, _ = prepare_recipe(run_dir / "recipe.yaml", overrides)
    recorded = _recorded_data(checkpoint)
    data = None
    if recorded is not None:
        loader_batch = recipe["loader"].get("batch_size")
        data = stand_in_data(checkpoint["classes"], recorded, loader_batch if isinstance(loader_batch, int) else 1)
    try:
        run = build_run(recipe, run_dir=run_dir, callbacks="evaluation", checkpoint=checkpoint, data=data)
    except CheckpointError as exc:
        raise CheckpointError(f"{checkpoint_path} does not belong to the run in {run_dir} ({exc})") from None
    state = run.state
    if list(state.data.classes) != list(checkpoint.get("classes") or state.data.classes):
        raise CheckpointError(f"{checkpoint_path} was trained on the classes {checkpoint['classes']} but the recipe in "
                              f"{run_dir} gives {state.data.classes}; pass the checkpoint of this run")
    call_hook(state.plugin_manager, "before_eval", state=state)  # e.g. the EMA copy becomes the evaluation model
    model = (state.unwrapped_model if raw else state.unwrapped_eval_model).eval()
    for param in model.parameters():
        param.requires_grad_(False)  # inference only: traced and exported graphs need no gradients
    batch_size = getattr(state.test_loader, "batch_size", None)
    return LoadedRun(run=run, model=model, classes=list(state.data.classes), recipe=run.recipe,
                     image_shape=tuple(int(v) for v in state.data.image_shape), mean=tuple(state.data.mean),
                     std=tuple(state.data.std), checkpoint_path=checkpoint_path, epoch=int(checkpoint["epoch"]), raw=raw,
                     batch_size=batch_size if isinstance(batch_size, int) and batch_size > 0 else DEFAULT_BATCH_SIZE,
                     from_recorded_data=data is not None, history=list(checkpoint.get("history") or []))
