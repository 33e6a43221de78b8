"""``microtrain run``: recipe + overrides -> plugins -> state -> engine, with the run dir kept
consistent whatever happens (status.json says running / completed / failed / interrupted)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from microtrain import distributed
from microtrain.checkpoint import load_checkpoint, restore_checkpoint
from microtrain.engine import Engine, build_state, enable_plugins
from microtrain.errors import MicrotrainError, RecipeError
from microtrain.plugin_manager import create_plugin_manager
from microtrain.recipe import apply_overrides, dump_recipe, load_recipe_file, resolve_recipe

LAST_CHECKPOINT = Path("checkpoints") / "last.pt"


def prepare_recipe(recipe_path: str | Path, overrides: list[str]):
    """Load, override and validate a recipe; returns (recipe, plugin manager, registry)."""
    raw = load_recipe_file(recipe_path)
    overridden, from_cli = apply_overrides(raw, overrides)
    pm, registry = create_plugin_manager()
    plugins = overridden.get("plugins") or []
    modules = [p for p in plugins if isinstance(p, str) and not registry.has("callback", p)] if isinstance(plugins, list) else []
    if modules:
        pm, registry = create_plugin_manager(modules)
    recipe = resolve_recipe(overridden, registry, from_cli, raw)
    return recipe, pm, registry


def default_run_dir(recipe: dict[str, Any]) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / recipe["name"] / stamp


def write_status(run_dir: Path, status: str, message: str = "") -> None:
    data = {"status": status, "message": message, "updated": datetime.datetime.now().isoformat(timespec="seconds")}
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, run_dir / "status.json")


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise MicrotrainError(f"run dir '{run_dir}' is not writable ({exc.strerror}); pass --run-dir to a writable folder") from None


def _recipe_changes(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _recipe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _shared_run_dir(run_dir: Path | None, recipe: dict[str, Any]) -> Path:
    """Every rank must use rank 0's run dir (timestamps could differ)."""
    chosen = [str(run_dir or default_run_dir(recipe))]
    if distributed.is_active():
        import torch.distributed as dist

        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


class _Signalled(KeyboardInterrupt):
    """SIGTERM, turned into the same path as Ctrl-C."""


def _raise_on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Signalled(f"signal {signum}")


def run(recipe_path: str | Path, overrides: list[str], run_dir: Path | None = None,
        resume: Path | None = None, force: bool = False) -> int:
    """Train one recipe. Returns the process exit status."""
    recipe, pm, registry = prepare_recipe(recipe_path, overrides)
    distributed.init(recipe["device"])
    try:
        return _run(recipe, pm, registry, run_dir, resume, force)
    finally:
        distributed.shutdown()


def _run(recipe, pm, registry, run_dir, resume, force) -> int:
    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        saved_path = run_dir / "recipe.yaml"
        if not saved_path.is_file():
            raise MicrotrainError(f"--resume: '{run_dir}' has no recipe.yaml; pass the run dir of an earlier run")
        saved = yaml.safe_load(saved_path.read_text())
        changed = _recipe_changes(saved, recipe)
        if changed and not force:
            raise RecipeError(
                f"--resume: the recipe differs from the one '{run_dir}' was started with in: {', '.join(changed)}; "
                "use the same recipe and overrides, or add --force"
            )
        checkpoint = load_checkpoint(run_dir / LAST_CHECKPOINT)
    run_dir = _shared_run_dir(run_dir, recipe)
    is_main = distributed.rank() == 0
    if is_main:
        _check_writable(run_dir)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        write_status(run_dir, "running")
    distributed.barrier()

    enable_plugins(recipe, pm, registry)
    state = build_state(recipe, run_dir, pm, registry)
    if checkpoint is not None:
        restore_checkpoint(state, checkpoint, pm)
    engine = Engine(state, pm)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _in_main_thread() else None
    try:
        engine.fit()
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        state.status = "interrupted" if interrupted else "failed"
        message = "interrupted" if interrupted else (str(error) if isinstance(error, MicrotrainError) else
                                                     f"{type(error).__name__}: {error}")
        _call_on_error(pm, state, error)
        if is_main:
            with open(run_dir / "error.log", "a") as log:
                log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {state.status}\n")
                traceback.print_exception(error, file=log)
            write_status(run_dir, state.status, message)
        if interrupted:
            print(f"microtrain: interrupted at epoch {state.epoch}; resume with: microtrain run RECIPE --resume {run_dir}",
                  file=sys.stderr)
            return 130
        if isinstance(error, MicrotrainError):
            raise
        raise MicrotrainError(f"{message} (traceback in {run_dir / 'error.log'})") from error
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if is_main:
        write_status(run_dir, state.status)
    return 0


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _call_on_error(pm, state, error) -> None:
    """Run every plugin's on_error even if one of them raises."""
    for impl in reversed(pm.hook.on_error.get_hookimpls()):
        try:
            impl.function(state=state, error=error)
        except Exception as exc:  # noqa: BLE001 - one failing cleanup must not stop the others
            print(f"microtrain: plugin '{impl.plugin_name}' failed in on_error: {exc}", file=sys.stderr)
