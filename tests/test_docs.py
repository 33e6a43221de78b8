"""The README and docs/*.md, checked the way a reader uses them.

- The README's plugin example runs exactly as written there.
- Every command line in a fenced block (``microtrain ...``, ``python -m microtrain ...``, ``torchrun ...``,
  ``python benchmarks/X.py ...``) names a real subcommand, script and recipe, and its arguments parse; nothing
  trains. Each benchmark script's ``--help`` runs once, and the options a line uses must be in it.
- The README's recipe block is the recipe file's content; every relative link, anchor and repository path the
  pages name exists; every hook name they mention is a hook of microtrain.hookspecs; every page is linked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from itertools import product
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- (file: (?P<name>\S+)|command) -->\n```[a-z]*\n(?P<body>.*?)```", re.S)
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
COMMAND_STARTS = ("microtrain ", "python -m microtrain ", "torchrun ", "python benchmarks/")
README_MAX_LINES = 300


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _example_files() -> set[str]:
    """Files the README's plugin example creates (``<!-- file: NAME -->``): a command may name them."""
    return {m.group("name") for m in BLOCK.finditer((REPO / "README.md").read_text()) if m.group("name")}


def _command_lines() -> list[tuple[str, str]]:
    """(page:line, command) for every command line in a fenced block; continuation lines joined, `$ ` dropped."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.finditer(text):
            first_line = text.count("\n", 0, block.start(1)) + 1
            pending, start = "", 0
            for offset, raw in enumerate(block.group(1).splitlines()):
                line = raw.strip()
                if not pending:
                    start = first_line + offset
                    line = line.removeprefix("$ ")
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                    continue
                line, pending = pending + line, ""
                if line.startswith(COMMAND_STARTS):
                    found.append((f"{_rel(page)}:{start}", line))
    return found


COMMANDS = _command_lines()


@cache
def _microtrain_parser():
    from microtrain.cli import _parser
    from microtrain.plugin_manager import create_plugin_manager

    pm, _ = create_plugin_manager()
    return _parser(pm)


@cache
def _benchmark_help() -> dict[str, tuple[int, str]]:
    """``python benchmarks/X.py --help`` for every script the pages name, all at once: {script: (status, output)}."""
    scripts = sorted({shlex.split(cmd)[1] for _, cmd in COMMANDS if cmd.startswith("python benchmarks/")})
    scripts = [s for s in scripts if (REPO / s).is_file()]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for s in scripts}
    return {s: (p.wait(timeout=120), p.stdout.read()) for s, p in procs.items()}


def _check_recipe(path: str, where: str) -> None:
    """A recipe a command names exists under recipes/ (or is a file the README's example creates, or RECIPE)."""
    if path in _example_files() or path.isupper():
        return
    assert path.startswith("recipes/") and (REPO / path).is_file(), f"{where}: no recipe {path} under recipes/"


def _microtrain_argv(words: list[str], where: str) -> list[str]:
    """The arguments a command line gives to microtrain's own command line."""
    if words[0] == "microtrain":
        return words[1:]
    if words[:3] == ["python", "-m", "microtrain"]:
        return words[3:]
    assert words[0] == "torchrun"
    from torch.distributed.run import get_args_parser

    try:
        args = get_args_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"{where}: torchrun does not accept: {shlex.join(words)}")
    assert args.module and args.training_script == "microtrain", f"{where}: torchrun should run -m microtrain"
    return args.training_script_args


@pytest.mark.parametrize("where, line", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_is_valid(where, line):
    words = shlex.split(line, comments=True)
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        script = words[1]
        assert (REPO / script).is_file(), f"{where}: no script {script}"
        status, help_text = _benchmark_help()[script]
        assert status == 0, f"{where}: python {script} --help failed:\n{help_text}"
        for word in words[2:]:
            if word.startswith("--"):
                assert word.split("=")[0] in help_text, f"{where}: {script} has no option {word}"
            elif word.endswith((".yaml", ".yml")):
                _check_recipe(word, where)
        return
    from microtrain.cli import parse_command_line

    argv = _microtrain_argv(words, where)
    try:
        args = parse_command_line(_microtrain_parser(), argv)
    except SystemExit:
        pytest.fail(f"{where}: microtrain does not accept: {shlex.join(argv)}")
    assert getattr(args, "handler", None), f"{where}: no microtrain subcommand in: {line}"
    if getattr(args, "recipe", None):
        _check_recipe(args.recipe, where)
    for override in getattr(args, "overrides", []):
        assert "=" in override and not override.startswith("="), f"{where}: {override!r} is not KEY=VALUE"


def test_pages_have_commands_of_every_kind():
    """The collector found the commands (a changed fence or prompt style would silently check nothing)."""
    kinds = {start for _, line in COMMANDS for start in COMMAND_STARTS if line.startswith(start)}
    assert kinds == set(COMMAND_STARTS)
    assert len(COMMANDS) >= 40


def test_readme_recipe_block_is_the_recipe_file():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"<!-- recipe: (\S+) -->\n```yaml\n(.*?)```", readme, re.S)
    assert blocks, "the README shows one recipe, marked <!-- recipe: PATH -->"
    for path, body in blocks:
        assert yaml.safe_load(body) == yaml.safe_load((REPO / path).read_text()), f"README's copy of {path} is stale"


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"
    text = "\n".join(lines)
    for command in ('pip install "torch==2.13.0" -e ".[dev]"', "python -m pytest -q"):  # what .ci/run runs
        assert f"```bash\n{command}\n```" in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _expand(path: str) -> list[str]:
    """`fast_seed{0,1,2}.jsonl` -> the three names."""
    parts = re.split(r"\{([^}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in product(*choices)]


REPO_PATH = re.compile(r"(?<![\w./~-])((?:docs|recipes|benchmarks|tests|plugins|microtrain)/[\w./{},*-]*)")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_and_paths_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{_rel(page)}: link to missing {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{_rel(page)}: no heading for #{anchor} in {path or page.name}"
    for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)) + FENCE.findall(text):
        for path in REPO_PATH.findall(span):
            path = path.rstrip(".,")
            if "<" in path or path.endswith("/*"):
                continue
            for name in _expand(path):
                matches = list(REPO.glob(name)) if "*" in name else [REPO / name]
                assert matches and all(m.exists() for m in matches), f"{_rel(page)}: {name} does not exist"


def test_hook_names_are_hooks():
    from microtrain import hookspecs

    hooks = {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "microtrain_spec")}
    assert {"before_epoch", "after_batch", "on_eval"} <= hooks
    for page in PAGES:
        for name in re.findall(r"`((?:before|after|on|register)_[a-z_]+)", page.read_text()):
            assert name in hooks, f"{_rel(page)}: `{name}` is not a hook in microtrain/hookspecs.py"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    index = (REPO / "docs" / "README.md").read_text()
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"(docs/{page.name})" in readme and f"({page.name})" in index, f"docs/{page.name} is not linked"


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


def test_docs_python_examples_run(tmp_path):
    """Every ``<!-- run: python -->`` block of the docs runs as written, in a fresh folder."""
    marked = re.compile(r"<!-- run: python -->\n```python\n(?P<body>.*?)```", re.S)
    examples = [(page, m.group("body")) for page in PAGES for m in marked.finditer(page.read_text())]
    assert examples, "no runnable Python example found in the docs"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    for page, body in examples:
        result = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True, env=env,
                                timeout=600)
        assert result.returncode == 0, f"{_rel(page)}: {result.stderr[-2000:]}"
