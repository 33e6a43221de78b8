"""``microtrain run``: recipe + overrides -> plugins -> state -> engine, with the run dir kept
consistent whatever happens (status.json says running / completed / failed / interrupted)."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from microtrain import distributed
from microtrain.assembly import build_run, default_run_dir, prepare_recipe
from microtrain.checkpoint import load_checkpoint
from microtrain.engine import Engine
from microtrain.errors import CheckpointError, MicrotrainError, PluginError, PluginHookError, RecipeError, Signalled
from microtrain.recipe import dump_recipe, normalise_plugins

LAST_CHECKPOINT = Path("checkpoints") / "last.pt"


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


def _signal_handler(engine: Engine):
    """First Ctrl-C/SIGTERM: the engine stops after the step in progress, where a checkpoint captures the exact
    position. A second one abandons the step. Distributed runs stop at once: ranks may be at different steps."""

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if engine.stop_signal is None and not distributed.is_active():
            engine.request_stop(signum)
            os.write(2, f"\nmicrotrain: {signal.Signals(signum).name} received: stopping after the current step to save "
                        "a checkpoint (send it again to stop at once)\n".encode())  # no print: not reentrant
            return
        raise Signalled(f"signal {signum}")

    return handler


def _load_for_resume(path: Path, command: str) -> dict[str, Any]:
    """The checkpoint to resume from; when it is damaged, the line says which other one to resume from."""
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        other = next((p for p in (path.with_name("previous.pt"), path.with_name("best.pt")) if p.is_file() and p != path),
                     None)
        if other is None:
            raise
        raise CheckpointError(f"{exc}; an older one is kept: {command} --resume {shlex.quote(str(other))}") from None


def run(recipe_path: str | Path, overrides: list[str], run_dir: Path | None = None,
        resume: Path | None = None, force: bool = False) -> int:
    """Train one recipe. Returns the process exit status."""
    recipe, _, registry = prepare_recipe(recipe_path, overrides)
    distributed.init(recipe["device"])
    command = " ".join(["microtrain run", *map(shlex.quote, [str(recipe_path), *overrides])])
    try:
        return _run(recipe, registry, run_dir, resume, force, command)
    except MicrotrainError as error:
        distributed.tag_error(error)  # "rank R of N: ..." when distributed
        raise
    except RuntimeError as error:  # a collective outside the training loop failed: another rank is gone
        if not (distributed.is_active() and distributed.is_communication_error(error)):
            raise
        raise distributed.tag_error(MicrotrainError(distributed.failure_message(error))) from error
    finally:
        distributed.shutdown()


def _run(recipe, registry, run_dir, resume, force, command: str) -> int:
    """``command`` is the command line (without --run-dir/--resume) that a resume repeats."""
    checkpoint = None
    if resume is not None:
        resume = Path(resume)
        run_dir = resume.parent.parent if resume.is_file() else resume  # RUN_DIR or RUN_DIR/checkpoints/X.pt
        saved_path = run_dir / "recipe.yaml"
        if not saved_path.is_file():
            raise MicrotrainError(f"--resume: '{run_dir}' has no recipe.yaml; pass the run dir of an earlier run")
        saved = yaml.safe_load(saved_path.read_text())
        if isinstance(saved, dict) and isinstance(saved.get("plugins"), list):
            try:  # a run dir written before plugins had their normal form lists bare callback names
                saved["plugins"] = normalise_plugins(saved["plugins"], registry)
            except MicrotrainError:
                pass  # the difference is reported below
        changed = _recipe_changes(saved, recipe)
        if changed and not force:
            raise RecipeError(
                f"--resume: the recipe differs from the one '{run_dir}' was started with in: {', '.join(changed)}; "
                "use the same recipe and overrides, or add --force"
            )
        checkpoint_path = resume if resume.is_file() else run_dir / LAST_CHECKPOINT
        if checkpoint_path.is_file():
            checkpoint = _load_for_resume(checkpoint_path, command)
        elif distributed.rank() == 0:  # killed before its first checkpoint: the same run from the start
            print(f"microtrain: '{run_dir}' has no checkpoint yet; running it again from the start", file=sys.stderr)
    run_dir = _shared_run_dir(run_dir, recipe)
    is_main = distributed.rank() == 0
    if is_main:
        _check_writable(run_dir)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
        write_status(run_dir, "running")
    distributed.barrier()

    try:
        assembled = build_run(recipe, run_dir=run_dir, checkpoint=checkpoint,
                              extra_plugins={distributed.ResumeGuard.name: distributed.ResumeGuard()})
        state, engine, pm = assembled.state, assembled.engine, assembled.plugin_manager
    except BaseException as error:  # nothing trained yet, but the run dir must not say "running"
        if is_main:
            interrupted = isinstance(error, KeyboardInterrupt)
            write_status(run_dir, "interrupted" if interrupted else "failed",
                         "interrupted" if interrupted else _one_line(distributed.failure_message(error)))
        raise
    signals = (signal.SIGINT, signal.SIGTERM) if _in_main_thread() else ()
    previous = {signum: signal.signal(signum, _signal_handler(engine)) for signum in signals}
    try:
        engine.fit()
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        state.status = "interrupted" if interrupted else "failed"
        message = "interrupted" if interrupted else _one_line(distributed.failure_message(error))
        _call_on_error(pm, state, error)
        if is_main:
            with open(run_dir / "error.log", "a") as log:
                log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {state.status}\n")
                traceback.print_exception(error, file=log)
            write_status(run_dir, state.status, message)
        if interrupted:
            if is_main:
                last = run_dir / LAST_CHECKPOINT
                kept = f"last checkpoint: {last}" if last.is_file() else "no checkpoint was written (plugin 'checkpoint' is off)"
                print(f"microtrain: interrupted at epoch {state.epoch}, step {state.batch_index} of {state.steps_per_epoch}; "
                      f"{kept}; resume with: {command} --resume {shlex.quote(str(run_dir))}", file=sys.stderr)
            return 130
        if isinstance(error, MicrotrainError) and not isinstance(error, PluginHookError):
            raise
        if is_main:
            where = f" (traceback in {run_dir / 'error.log'})"
        elif distributed.is_communication_error(error):
            where = ""
        else:  # only rank 0 writes error.log: this rank's traceback goes to its stderr
            traceback.print_exception(error, file=sys.stderr)
            where = " (traceback above)"
        raise (PluginError if isinstance(error, PluginError) else MicrotrainError)(f"{message}{where}") from error
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if is_main:
        write_status(run_dir, state.status)
    return 0


def _one_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else message


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
