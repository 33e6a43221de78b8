"""microtrain's built-in plugins. Each module is registered through an entry point of group
``microtrain`` in pyproject.toml, exactly as a third-party plugin would be."""
