"""microtrain: a small, plugin-based PyTorch framework for training image classifiers from a YAML recipe.

Write a plugin with ``@microtrain.hookimpl`` functions; see microtrain.hookspecs for the hooks.
"""

from microtrain.components import Check, Range
from microtrain.errors import MicrotrainError
from microtrain.hookspecs import hookimpl, hookspec
from microtrain.state import ImageData, LoaderContext, State

__version__ = "0.1.0"
__all__ = ["Check", "hookimpl", "hookspec", "ImageData", "LoaderContext", "MicrotrainError", "Range", "State", "__version__"]
