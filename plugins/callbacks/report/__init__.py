"""The ``report`` callback and the ``microtrain report RUN_DIR`` command: what a person reads after a
run, in ``<run dir>/report/``:

    curves.png          train/test accuracy and loss per epoch, learning rate per step
    per_class.png       per-class test accuracy of the final model (beside a reference when given)
    confusion.png       confusion matrix, normalised by true class
    misclassified.png   the most confidently wrong test images, ``true -> predicted (confidence)``
    augmentations.png   training images exactly as the train loader delivers them
    report.md           summary, the pictures and the tables (readable on GitHub)
    report.json         the same figures for programs; run_info.json, lr_steps.json: what the
                        command needs to redraw the report later

Split by job: ``tables`` (the numbers), ``figures`` (matplotlib), ``predictions`` (mistakes and
loader samples), ``render`` (writing the files), ``callback`` (the callback and the command).
"""

from microtrain_plugins.callbacks.report.callback import FOLDER, Report, build_report, report_run_dir
from microtrain_plugins.callbacks.report.figures import (
    confusion_figure,
    curves_figure,
    figure_inches,
    figure_pixels,
    figure_rgb,
    grid_figure,
    per_class_figure,
)
from microtrain_plugins.callbacks.report.predictions import MistakeCollector, Predictions, denormalise, loader_samples
from microtrain_plugins.callbacks.report.render import FILES, make_report
from microtrain_plugins.callbacks.report.tables import ClassRow, class_table, confusion_matrix, normalise_rows

__all__ = [
    "FILES", "FOLDER", "ClassRow", "MistakeCollector", "Predictions", "Report", "build_report", "class_table",
    "confusion_figure", "confusion_matrix", "curves_figure", "denormalise", "figure_inches", "figure_pixels",
    "figure_rgb", "grid_figure", "loader_samples", "make_report", "normalise_rows",
    "per_class_figure", "report_run_dir",
]
