"""The installed wheel, not the editable checkout: build microtrain's wheel, install it (not editable) into a
throw-away environment, and use it from a folder that holds its own ``plugins`` package.

An editable install resolves ``microtrain`` and the built-ins straight from the repository, so it hides
packaging mistakes: a subpackage missing from ``[tool.setuptools] packages``, an entry point naming a module the
wheel lacks, or the built-ins installed under a common top-level name (``plugins``) that a user's own folder of
the same name shadows -- the CLI puts the current folder first on ``sys.path``.

The throw-away environment borrows the third-party packages (torch, numpy, ...) of the environment running the
tests through a ``.pth`` file that lists its site-packages folders: a folder added that way is only appended to
``sys.path``; the ``.pth`` files inside it (the editable install's import hook among them) are not run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_RECIPE

BUILTIN_SUBPACKAGES = ("models", "data", "loaders", "callbacks")
EXPECTED_TOP_LEVEL = {"microtrain", "microtrain_plugins"}  # besides microtrain-<version>.dist-info

# What the source copy leaves out: VCS data, environments, caches, build output, runs, data sets, checkpoints.
_IGNORE_EVERYWHERE = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "*.pyc", "*.pt")
_IGNORE_AT_TOP = {"build", "dist", "runs", "data", "docs"}


def _copy_ignore(folder: str, names: list[str]) -> set[str]:
    ignored = set(_IGNORE_EVERYWHERE(folder, names))
    if Path(folder).resolve() == REPO:
        ignored |= _IGNORE_AT_TOP & set(names)
    return ignored

# A user's project: its own `plugins` package that must never be imported by microtrain's built-ins.
HOSTILE_PLUGINS_INIT = 'raise ImportError("the user\'s own plugins package was imported")\n'

USER_PLUGIN = textwrap.dedent('''\
    """A recipe-named plugin module beside the recipe."""
    import microtrain


    @microtrain.hookimpl
    def after_epoch(state):
        print(f"[my_plugin] after_epoch {state.epoch}", flush=True)
    ''')

USER_PACKAGE_PLUGIN = textwrap.dedent('''\
    """A plugin inside the user's own `plugins` package."""
    import microtrain


    @microtrain.hookimpl
    def after_epoch(state):
        print(f"[plugins.extra] after_epoch {state.epoch}", flush=True)
    ''')

# Runs inside the throw-away environment (with `python -c`, so the working folder is first on sys.path).
PROBE = textwrap.dedent('''\
    import importlib.metadata as md, json, sys
    import microtrain, microtrain_plugins
    from microtrain.plugin_manager import create_plugin_manager
    pm, registry = create_plugin_manager()
    eps = list(md.entry_points(group="microtrain"))
    print(json.dumps({
        "microtrain": microtrain.__file__,
        "microtrain_plugins": microtrain_plugins.__file__,
        "dist": str(md.distribution("microtrain").locate_file("")),
        "entry_points": {ep.name: ep.value for ep in eps},
        "entry_point_dists": sorted({str(ep.dist.locate_file("")) for ep in eps if ep.dist}),
        "plugin_files": {name: getattr(p, "__file__", None) for name, p in pm.list_name_plugin()},
        "components": {kind: sorted(c) for kind, c in registry.all().items()},
        "editable_hooks": [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()],
        "user_plugins_imported": "plugins" in sys.modules,
    }))
    ''')


def _run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")


def _check(result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{what} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-8000:]}"
    return result


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """microtrain's wheel, built without build isolation (offline) from a copy of the working tree.

    The copy keeps setuptools' in-tree build/ and *.egg-info out of the repository, and a stale build/ folder
    there out of the wheel."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed (it is in the dev extra); cannot build the wheel without build isolation")
    if int(version.split(".")[0]) < 77:
        pytest.skip(f"setuptools {version} is older than the build requirement setuptools>=77")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=_copy_ignore)
    out = tmp / "dist"
    # An absolute path: pip would look a bare word up as a requirement name on the package index.
    _check(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out),
                 str(source.resolve())], timeout=240), "pip wheel")
    (built,) = out.glob("microtrain-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh environment with the wheel installed (not editable) and this environment's third-party packages."""
    env = tmp_path_factory.mktemp("env") / "venv"
    _check(_run([sys.executable, "-m", "venv", "--without-pip", str(env)], timeout=120), "python -m venv")
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # Install before the .pth below exists: otherwise pip would see the test environment's microtrain as installed
    # in the target and uninstall it from there.
    _check(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                timeout=240), "pip install <wheel>")
    purelib = Path(_check(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60),
                          "new environment's python").stdout.strip())
    borrowed = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        borrowed.append(site.getusersitepackages())
    borrowed = [p for p in dict.fromkeys(os.path.realpath(p) for p in borrowed) if os.path.isdir(p)]
    (purelib / "zz_borrowed_test_environment.pth").write_text("".join(f"{p}\n" for p in borrowed))
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    environ.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONNOUSERSITE="1", VIRTUAL_ENV=str(env), OMP_NUM_THREADS="1",
                   MPLBACKEND="Agg", COLUMNS="250",  # rich wraps its tables at the width
                   PATH=f"{python.parent}{os.pathsep}{environ.get('PATH', '')}")
    script = shutil.which("microtrain", path=str(python.parent))
    return {"env": env, "python": python, "site": purelib, "environ": environ, "script": script}


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    """A working folder whose own `plugins` package raises when imported."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "__init__.py").write_text(HOSTILE_PLUGINS_INIT)
    return tmp_path


@pytest.fixture
def user_project(tmp_path) -> Path:
    """A working folder with its own `plugins` package (holding a plugin), a plugin module and a tiny recipe."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "__init__.py").write_text('"""The user\'s own plugins package."""\nOWNER = "user"\n')
    (tmp_path / "plugins" / "extra.py").write_text(USER_PACKAGE_PLUGIN)
    (tmp_path / "my_plugin.py").write_text(USER_PLUGIN)
    recipe = {**TINY_RECIPE, "epochs": 1, "threads": 1, "plugins": ["metrics", "my_plugin", "plugins.extra"]}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return tmp_path


def test_wheel_holds_microtrain_and_microtrain_plugins_only(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (entry_points_file,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points_text = zf.read(entry_points_file).decode()
    top_level = {name.split("/")[0] for name in names}
    dist_info = {t for t in top_level if t.endswith(".dist-info")}
    assert len(dist_info) == 1, sorted(top_level)
    assert top_level - dist_info == EXPECTED_TOP_LEVEL, f"unexpected top-level entries in the wheel: {sorted(top_level)}"
    assert "plugins" not in top_level and not any(n.startswith("plugins/") for n in names)
    for sub in BUILTIN_SUBPACKAGES:
        assert f"microtrain_plugins/{sub}/__init__.py" in names, f"microtrain_plugins/{sub}/ is not in the wheel"

    # Every module of the repository's microtrain/ and plugins/ folders is in the wheel, under its installed name.
    source = wheel.parent.parent / "source"  # the copy the wheel was built from
    for folder, package in (("microtrain", "microtrain"), ("plugins", "microtrain_plugins")):
        sources = sorted(p.relative_to(source / folder).as_posix() for p in (source / folder).rglob("*.py"))
        missing = [s for s in sources if f"{package}/{s}" not in names]
        assert not missing, f"{folder}/ modules missing from the wheel as {package}/...: {missing}"

    # Every entry point of group microtrain names a microtrain_plugins module that the wheel holds.
    section, entry_points = None, {}
    for line in entry_points_text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "microtrain":
            name, value = (part.strip() for part in line.split("=", 1))
            entry_points[name] = value
    assert {"dsconv", "synthetic", "albumentations", "metrics", "ema"} <= set(entry_points), entry_points
    for name, value in entry_points.items():
        module = value.split(":")[0]
        assert module.startswith("microtrain_plugins."), f"entry point {name} = {value} is not in microtrain_plugins"
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, f"entry point {name} = {value}: module not in the wheel"
    assert "microtrain = microtrain.cli:main" in entry_points_text


def test_installed_wheel_is_what_runs(installed, hostile_folder):
    result = _check(_run([str(installed["python"]), "-c", PROBE], cwd=hostile_folder, env=installed["environ"], timeout=180),
                    "probe in the new environment")
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    env = installed["env"]
    for key in ("microtrain", "microtrain_plugins", "dist"):
        assert _inside(probe[key], env), f"{key} comes from {probe[key]}, not from the new environment {env}"
        assert not _inside(probe[key], REPO), f"{key} comes from the repository: {probe[key]}"
    assert all(_inside(p, env) for p in probe["entry_point_dists"]), probe["entry_point_dists"]
    assert not probe["editable_hooks"], f"the editable install's import hook is active: {probe['editable_hooks']}"
    assert not probe["user_plugins_imported"]
    assert all(v.startswith("microtrain_plugins.") for v in probe["entry_points"].values()), probe["entry_points"]
    for name, file in probe["plugin_files"].items():
        assert file is None or _inside(file, env), f"plugin {name} loaded from {file}"
    assert {"dsconv", "dsresnet"} <= set(probe["components"]["model"]), probe["components"]
    assert {"albumentations", "tensor"} <= set(probe["components"]["loader"]), probe["components"]
    assert {"ema", "metrics"} <= set(probe["components"]["callback"]), probe["components"]


def _assert_lists_builtins(result: subprocess.CompletedProcess) -> None:
    for text in ("dsconv", "dsresnet", "synthetic", "albumentations", "ema", "microtrain_plugins.models.dsconv"):
        assert text in result.stdout, f"{text!r} missing from `microtrain plugins`:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_plugins_command_beside_a_users_plugins_package(installed, hostile_folder):
    result = _run([str(installed["python"]), "-m", "microtrain", "plugins"], cwd=hostile_folder, env=installed["environ"],
                  timeout=180)
    _assert_lists_builtins(_check(result, "python -m microtrain plugins"))


def test_console_script_beside_a_users_plugins_package(installed, hostile_folder):
    script = installed["script"]
    if script is None:
        pytest.skip("pip created no microtrain console script in the new environment")
    result = _run([script, "plugins"], cwd=hostile_folder, env=installed["environ"], timeout=180)
    _assert_lists_builtins(_check(result, "microtrain plugins (console script)"))


@pytest.mark.parametrize("launcher", ["python -m", pytest.param("console script", marks=pytest.mark.slow)])
def test_run_with_recipe_plugins_beside_a_users_plugins_package(installed, user_project, launcher):
    if launcher == "console script":
        if installed["script"] is None:
            pytest.skip("pip created no microtrain console script in the new environment")
        command = [installed["script"]]
    else:
        command = [str(installed["python"]), "-m", "microtrain"]
    run_dir = user_project / "run"
    result = _run([*command, "run", "tiny.yaml", "--run-dir", str(run_dir)], cwd=user_project, env=installed["environ"],
                  timeout=300)
    _check(result, f"microtrain run ({launcher})")
    assert "[my_plugin] after_epoch 1" in result.stdout, result.stdout[-4000:]
    assert "[plugins.extra] after_epoch 1" in result.stdout, result.stdout[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1], rows
