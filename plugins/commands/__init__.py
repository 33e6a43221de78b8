"""Commands that use what a run trained: ``microtrain predict`` and ``microtrain export``, both built on
microtrain.load_run (docs/predict-and-export.md)."""
