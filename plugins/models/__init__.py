"""Models: network architectures a recipe picks with ``model.name``."""
