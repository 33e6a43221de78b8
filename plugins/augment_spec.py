"""The recipe's augmentation list, shared by every loader.

Written as albumentations transform names and arguments, in order:

    augment:
      - HorizontalFlip: {p: 0.5}
      - Affine: {translate_percent: [-0.1, 0.1], scale: [0.9, 1.1], rotate: [-10, 10], fill: [125, 123, 114], p: 0.5}

Each entry is a one-key mapping ``{TransformName: {argument: value}}`` (or a bare name for the
defaults). Loaders other than albumentations translate the names they support and refuse the rest.
"""

from __future__ import annotations

from typing import Any

from microtrain.errors import RecipeError


def parse_augment_list(entries: list[Any], where: str = "loader.augment") -> list[tuple[str, dict[str, Any]]]:
    """``[{Name: {args}}, "Name", ...]`` -> ``[(Name, args), ...]``, checking only the shape."""
    parsed = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            parsed.append((entry, {}))
            continue
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{where}[{i}]: write each transform as {{Name: {{argument: value}}}}, got {entry!r}")
        (name, args), = entry.items()
        if args is None:
            args = {}
        if not isinstance(name, str) or not isinstance(args, dict):
            raise RecipeError(f"{where}[{i}]: write each transform as {{Name: {{argument: value}}}}, got {entry!r}")
        parsed.append((name, dict(args)))
    return parsed


def unsupported(loader: str, name: str, supported: list[str], where: str) -> RecipeError:
    return RecipeError(
        f"{where}: transform '{name}' cannot be expressed by the {loader} loader; it supports "
        f"{', '.join(supported)} (use loader.name=albumentations for any albumentations transform)"
    )
