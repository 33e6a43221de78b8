"""The README's worked plugin example, executed exactly as written there."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO

BLOCK = re.compile(r"<!-- (file: (?P<name>\S+)|command) -->\n```[a-z]*\n(?P<body>.*?)```", re.S)


def test_readme_plugin_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    commands = []
    for match in BLOCK.finditer(readme):
        if match.group("name"):
            (tmp_path / match.group("name")).write_text(match.group("body"))
        else:
            commands.append(match.group("body").strip())
    assert (tmp_path / "my_plugin.py").is_file() and (tmp_path / "my_recipe.yaml").is_file()
    assert commands == ["microtrain run my_recipe.yaml --run-dir runs/my_first_plugin"]
    args = shlex.split(commands[0])
    script = Path(sys.executable).parent / args[0]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(script), *args[1:]], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "[my_plugin] epoch 1: test accuracy" in result.stdout
    rows = (tmp_path / "runs" / "my_first_plugin" / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(rows) <= 3
    assert json.loads(rows[-1])["test_acc"] > 30.0
    saved = (tmp_path / "runs" / "my_first_plugin" / "recipe.yaml").read_text()
    assert "tiny_cnn" in saved and "width: 16" in saved
