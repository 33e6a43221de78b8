"""microtrain's built-in plugins, installed as the package ``microtrain_plugins`` (the repository
folder ``plugins/``) and grouped by kind: ``models``, ``data``, ``loaders``, ``optim``, ``callbacks``.

Each module is registered through an entry point of group ``microtrain`` in pyproject.toml,
exactly as a third-party plugin would be; a recipe names components, never these modules."""
