"""``microtrain run``: recipe + overrides -> plugins -> state -> engine, with the run dir kept
consistent whatever happens.

The order matters: every check (run dir in use or holding another run, recipe changes a resume cannot
apply, damaged checkpoint) and the whole build come before the first write, so a command that refuses
or fails to start leaves the run dir exactly as it was. Then recipe.yaml and status.json ``running``
are written, and status.json ends ``completed``, ``failed`` or ``interrupted``; a ``running`` left by a
process that was killed is read as stale through the run dir's lock (microtrain/rundir.py)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import signal
import socket
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microtrain import distributed
from microtrain.assembly import build_run, default_run_dir, prepare_recipe
from microtrain.checkpoint import load_checkpoint, restore_checkpoint
from microtrain.engine import Engine
from microtrain.errors import CheckpointError, MicrotrainError, PluginError, PluginHookError, RecipeError, Signalled
from microtrain.recipe import dump_recipe, load_recipe_file, with_defaults
from microtrain.resume import (
    check_changes,
    check_epochs,
    check_steps_per_epoch,
    optimizer_hyperparameters,
    recipe_changes,
    replan,
    replans,
)
from microtrain.rundir import OpenRunDir

LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
"""Each stops the run after the current step with a checkpoint. SIGHUP: the terminal closed, which must not
lose the run."""


def write_status(run_dir: Path, status: str, message: str = "") -> None:
    data = {"status": status, "message": message, "updated": datetime.datetime.now().isoformat(timespec="seconds")}
    if status == "running":  # for people reading the file; whether it still runs is the lock's to say
        data.update(pid=os.getpid(), host=socket.gethostname())
    _write_atomic(run_dir / "status.json", json.dumps(data) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    """A reader (another command, a crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _say(line: str) -> None:
    """A line on stderr that cannot end the run (the terminal may be gone)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"microtrain: {line}", file=sys.stderr, flush=True)


class _TolerantStream:
    """stdout/stderr while a run trains: a write that fails because no one reads any more (``| head`` closed the
    pipe, SIGHUP closed the terminal) drops the output instead of ending the run, and the descriptor is pointed
    at /dev/null so that later writes, the interpreter's last flush included, succeed too."""

    def __init__(self, stream):
        self._stream = stream
        self._broken = False

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._silence()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._silence()

    def _silence(self) -> None:
        self._broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _tolerant_output() -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _TolerantStream(sys.stdout), _TolerantStream(sys.stderr)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        sys.stdout, sys.stderr = saved


def _signal_handler(engine: Engine):
    """First Ctrl-C/SIGTERM/SIGHUP: the engine stops after the step in progress, where a checkpoint captures the exact
    position. A second one abandons the step. Distributed runs stop at once: ranks may be at different steps."""

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if engine.stop_signal is None and not distributed.is_active():
            engine.request_stop(signum)
            with contextlib.suppress(OSError):  # no print: not reentrant; and the terminal may be gone (SIGHUP)
                os.write(2, f"\nmicrotrain: {signal.Signals(signum).name} received: stopping after the current step to "
                            "save a checkpoint (send it again to stop at once)\n".encode())
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
    """Train one recipe. Returns the process exit status.

    ``run_dir`` must be new or empty unless ``force`` (the run there is moved aside to ``<run_dir>.replaced-<time>``);
    ``resume`` continues the run in a run dir (``force``: with the recipe's changes, each applied or refused)."""
    recipe, _, registry = prepare_recipe(recipe_path, overrides)
    distributed.init(recipe["device"])
    command = " ".join(["microtrain run", *map(shlex.quote, [str(recipe_path), *overrides])])
    try:
        with _tolerant_output():
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


def _agree(error: BaseException | None) -> None:
    """Every rank raises when rank 0 refused (rank 0 re-raises its own error); the others cannot see rank 0's files."""
    if not distributed.is_active():
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    message = [None if error is None else str(error)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise MicrotrainError(f"rank 0 refused the run: {message[0]}")


def _open_run_dir(recipe: dict[str, Any], run_dir: Path | None, resume: bool, force: bool) -> tuple[Path, OpenRunDir | None]:
    """Rank 0 locks the run dir (and applies the run-dir rules); every rank learns its path."""
    opened, error = None, None
    if distributed.rank() == 0:
        try:
            opened = OpenRunDir.open(run_dir, default=default_run_dir(recipe), resume=resume, force=force)
        except MicrotrainError as exc:
            error = exc
    _agree(error)
    chosen = [str(opened.path) if opened is not None else ""]
    if distributed.is_active():
        import torch.distributed as dist

        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0]), opened


def _resume_target(run_dir: Path | None, resume: Path) -> tuple[Path, Path | None]:
    """The run dir of ``--resume RUN_DIR`` or ``--resume RUN_DIR/checkpoints/X.pt``, and that checkpoint file."""
    resume = Path(resume)
    resume_dir = resume.parent.parent if resume.is_file() else resume
    if run_dir is not None and Path(run_dir).resolve() != resume_dir.resolve():
        raise MicrotrainError(f"--run-dir '{run_dir}' and --resume '{resume}' name different run dirs; a resume continues "
                              "in its own run dir: drop --run-dir")
    if not (resume_dir / "recipe.yaml").is_file():
        raise MicrotrainError(f"--resume: '{resume_dir}' has no recipe.yaml; pass the run dir of an earlier run")
    return resume_dir, (resume if resume.is_file() else None)


def _saved_recipe(run_dir: Path, registry) -> dict[str, Any]:
    saved = load_recipe_file(run_dir / "recipe.yaml")  # a damaged file is one line, as a recipe's would be
    if not isinstance(saved, dict):
        raise MicrotrainError(f"--resume: '{run_dir / 'recipe.yaml'}' is not a recipe; pass the run dir of an earlier run")
    return with_defaults(saved, registry)


def _logged_epochs(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _recorded_status(run_dir: Path) -> str:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return str(json.loads((run_dir / "status.json").read_text()).get("status", ""))
    return ""


def _stop_signals() -> list[int]:
    """The signals this run handles (handlers can only be set from the main thread)."""
    return [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)] if _in_main_thread() else []


def _stop_at_once(signum, frame):  # noqa: ARG001 - signal handler signature
    """Before training, a stop signal ends the command as Ctrl-C does: nothing is written yet, so nothing is lost,
    and a run dir this command made is removed on the way out."""
    raise Signalled(f"signal {signum}")


def _run(recipe, registry, run_dir, resume, force, command: str) -> int:
    """``command`` is the command line (without --run-dir/--resume) that a resume repeats."""
    checkpoint_path = None
    if resume is not None:
        run_dir, checkpoint_path = _resume_target(run_dir, resume)
    previous = {signum: signal.signal(signum, _stop_at_once) for signum in _stop_signals()}
    try:
        run_dir, opened = _open_run_dir(recipe, run_dir, resume is not None, force)
        try:
            return _run_locked(recipe, run_dir, opened, resume is not None, checkpoint_path, force, registry, command)
        finally:
            if opened is not None:
                opened.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _prepare_resume(recipe, registry, run_dir: Path, checkpoint_path: Path | None, force: bool, command: str
                    ) -> tuple[dict[str, Any] | None, list[str]]:
    """Read-only checks of a resume: the recipe's changes, the checkpoint. Returns the checkpoint and the changes."""
    changed = recipe_changes(_saved_recipe(run_dir, registry), recipe)
    if changed and not force:
        raise RecipeError(
            f"--resume: the recipe differs from the one '{run_dir}' was started with in: {', '.join(changed)}; "
            "use the same recipe and overrides, or add --force"
        )
    checkpoint_path = checkpoint_path or run_dir / LAST_CHECKPOINT
    if not checkpoint_path.is_file():
        logged = _logged_epochs(run_dir)
        if logged:  # the checkpoint plugin was off: starting again would replace the logged epochs
            raise MicrotrainError(f"--resume: '{run_dir}' has {logged} epoch(s) logged but no checkpoint to continue "
                                  f"from (plugin 'checkpoint' was off); start a new run, or replace this one with "
                                  f"--run-dir {run_dir} --force")
        if distributed.rank() == 0:  # killed before its first checkpoint: the same run from the start
            _say(f"'{run_dir}' has no checkpoint yet; running it again from the start")
        return None, changed  # every change applies to a run that starts again
    checkpoint = _load_for_resume(checkpoint_path, command)
    if changed:
        check_changes(changed, run_dir)
        check_epochs(checkpoint, recipe["epochs"])
    return checkpoint, changed


def _run_locked(recipe, run_dir: Path, opened: OpenRunDir | None, resuming: bool, checkpoint_path: Path | None,
                force: bool, registry, command: str) -> int:
    """The run once rank 0 holds the run dir: checks and build first, writes after (see the module docstring)."""
    is_main = distributed.rank() == 0
    checkpoint, changed = _prepare_resume(recipe, registry, run_dir, checkpoint_path, force, command) if resuming \
        else (None, [])
    if checkpoint is not None and int(checkpoint["epoch"]) >= recipe["epochs"] and not checkpoint.get("batch_index") \
            and _recorded_status(run_dir) == "completed":
        if is_main:
            _say(f"'{run_dir}' has trained all {recipe['epochs']} epochs already; nothing to do (to train longer: "
                 f"{command} epochs=N --resume {shlex.quote(str(run_dir))} --force)")
        return 0

    assembled = build_run(recipe, run_dir=run_dir,
                          extra_plugins={distributed.ResumeGuard.name: distributed.ResumeGuard()})
    state, engine, pm = assembled.state, assembled.engine, assembled.plugin_manager
    if checkpoint is not None:
        fresh_groups, fresh_schedule = optimizer_hyperparameters(state.optimizer), state.scheduler.state_dict()
        restore_checkpoint(state, checkpoint)
        if changed:
            check_steps_per_epoch(checkpoint, state.steps_per_epoch, changed)
        if replans(changed):
            before, after = replan(state, fresh_groups, fresh_schedule)
            if is_main:
                _say(f"--force: optimizer and schedule re-planned for {recipe['epochs']} epochs "
                     f"({recipe['epochs'] * state.steps_per_epoch} steps); at step {state.step} the learning rate "
                     f"goes from {before:.6g} to {after:.6g}")

    for signum in _stop_signals():  # from the first write on, a signal stops after a step, with a checkpoint
        signal.signal(signum, _signal_handler(engine))
    error = None
    if is_main:
        try:
            for line in opened.commit(command):
                _say(line)
            _write_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))
            write_status(run_dir, "running")
        except (MicrotrainError, OSError) as exc:
            error = exc if isinstance(exc, MicrotrainError) else MicrotrainError(
                f"cannot write to run dir '{run_dir}' ({exc.strerror or exc}); free space or fix its permissions")
    _agree(error)
    return _fit(state, engine, pm, run_dir, command, is_main)


def _fit(state, engine: Engine, pm, run_dir: Path, command: str, is_main: bool) -> int:
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
                _say(f"interrupted at epoch {state.epoch}, step {state.batch_index} of {state.steps_per_epoch}; "
                     f"{kept}; resume with: {command} --resume {shlex.quote(str(run_dir))}")
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
