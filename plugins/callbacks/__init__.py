"""Callbacks a recipe enables in its ``plugins:`` list: progress display, metrics log,
checkpoints, summary, report, TensorBoard, EMA weights and test-time augmentation."""
