"""Loaders a recipe picks with ``loader.name``: they turn a dataset split into augmented,
normalised batches on the device. ``augment_spec`` is their shared reading of ``loader.augment``."""
