"""Datasets a recipe picks with ``data.name``: each returns images and labels held in memory."""
