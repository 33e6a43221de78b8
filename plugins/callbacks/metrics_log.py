"""Callback ``metrics``: ``<run dir>/metrics.jsonl``, one JSON object per epoch.

Fields: epoch, lr, train_loss, train_acc, test_loss, test_acc (percent), epoch_seconds,
train_images_per_second, per_class_acc (class -> percent), confusion (rows: true class), and
whatever other plugins added to ``state.metrics``. An epoch that was not evaluated (recipe field
``eval_every``) has no test (or validation) fields.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import microtrain
from microtrain import MicrotrainError

FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    """Read a run's metrics log; a missing or corrupt log is one clear error.

    A run logs each epoch once (a resume rewrites the log from its checkpoint), so an epoch that comes again
    means two processes wrote the run dir at once: figures such as a last-5 mean over it would be wrong."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise MicrotrainError(f"no metrics log at {path}; is '{run_dir}' a microtrain run dir?")
    rows, lines_of = [], {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MicrotrainError(f"{path}:{number}: corrupt metrics line ({exc.msg}); fix or delete that line") from None
        if not isinstance(row, dict) or "epoch" not in row:
            raise MicrotrainError(f"{path}:{number}: not a metrics record (no 'epoch'); fix or delete that line")
        if row["epoch"] in lines_of:
            raise MicrotrainError(f"{path}:{number}: epoch {row['epoch']} again (first on line {lines_of[row['epoch']]}): two "
                                  "processes wrote this run at once, so its figures are not one run's; keep one "
                                  "line per epoch, or train the run again")
        lines_of[row["epoch"]] = number
        rows.append(row)
    if not rows:
        raise MicrotrainError(f"{path} holds no epochs yet; train at least one epoch")
    return rows


class MetricsLog:
    @microtrain.hookimpl
    def before_fit(self, state):
        """(Re)write the log from the history, so a resumed run has exactly the checkpointed epochs."""
        if not state.is_main:
            return
        path = state.run_dir / FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(_clean(row)) + "\n" for row in state.history))
        os.replace(tmp, path)

    @microtrain.hookimpl
    def after_epoch(self, state):
        if not state.is_main:
            return
        with open(state.run_dir / FILE, "a") as handle:
            handle.write(json.dumps(_clean(state.metrics)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def build_metrics() -> MetricsLog:
    """Per-epoch metrics as JSON lines in <run dir>/metrics.jsonl."""
    return MetricsLog()


@microtrain.hookimpl
def register_components(registry):
    registry.callback("metrics", build_metrics)
