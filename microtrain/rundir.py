"""Who may write a run dir, and what a command may do to a run dir that already holds a run.

    <run dir>/lock    {"pid", "host", "started", "command"} of the process writing the run dir

One process writes a run dir at a time: it holds an ``fcntl.flock`` on ``lock``. The kernel drops a
flock when its process ends, however it ends (SIGKILL and power loss included), so "a live process
holds the lock" is the one reliable sign that a run is running; ``status.json`` saying ``running``
without it is stale. The file's pid and host are only for the messages. A lock file whose flock is
free was left by a process that died without removing it: on this host that is certain and a resume
takes it over; from another host it is not (flock need not reach across hosts on a network file
system), so the command refuses and names the file to delete.

The rules for an existing run (``docs/reliability.md#run-dirs``): ``--run-dir`` of a run refuses and
names ``--resume`` and ``--force``; ``--run-dir D --force`` moves the old run aside to
``D.replaced-<timestamp>`` (never deletes or mixes files); ``--resume`` continues it in place.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from microtrain.errors import MicrotrainError

LOCK_FILE = "lock"
RUN_FILES = ("recipe.yaml", "status.json", "metrics.jsonl", "checkpoints", "error.log")
"""Any of these makes a folder a run dir: a new run there would overwrite or mix with them."""


@dataclass(frozen=True)
class Holder:
    """The process that wrote a lock file."""

    pid: int
    host: str
    started: str = ""
    command: str = ""

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def __str__(self) -> str:
        since = f" since {self.started}" if self.started else ""
        return f"pid {self.pid} on host {self.host}{since}"


def _read_holder(fd: int) -> Holder | None:
    """The holder recorded in an open lock file; None when it is empty or unreadable (not a microtrain lock)."""
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode() or "null")
        return Holder(int(data["pid"]), str(data["host"]), str(data.get("started", "")), str(data.get("command", "")))
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDirLock:
    """The flock on ``<run dir>/lock``. :meth:`acquire` only takes the flock; :meth:`take` records this process
    in the file, so a command that refuses after looking (existing run, changed recipe) leaves the file as it was."""

    def __init__(self, path: Path, fd: int, created: bool, previous: Holder | None):
        self.path, self.fd, self.created = path, fd, created
        self.previous = previous  # a dead holder whose lock this process found (stale), if any
        self.taken = False
        self.original = b"" if created else os.pread(fd, 65536, 0)  # put back by release(keep_original=True)

    @classmethod
    def acquire(cls, run_dir: Path) -> RunDirLock:
        """Lock an existing folder, or refuse (MicrotrainError) naming the live holder, or one on another host."""
        path = Path(run_dir) / LOCK_FILE
        while True:
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(path, os.O_RDWR | os.O_CLOEXEC), False
                except FileNotFoundError:  # its holder removed it as it finished: try again
                    continue
            except OSError as exc:
                raise MicrotrainError(f"run dir '{run_dir}' is not writable ({exc.strerror}); pass --run-dir to a "
                                      "writable folder") from None
            try:
                locked = _flock(fd)
            except BaseException:
                os.close(fd)
                raise
            holder = None if created else _read_holder(fd)
            if locked is False:
                os.close(fd)
                raise MicrotrainError(f"run dir '{run_dir}' is in use by {holder or 'another process'}; wait for it to finish "
                                  "or stop it (Ctrl-C, or kill -TERM with its pid) and resume")
            if not _is_file_at(fd, path):  # its holder removed it between our open and our flock: a new one is needed
                os.close(fd)
                continue
            lock = cls(path, fd, created, holder)
            if holder is not None and (not holder.on_this_host or (locked is None and _pid_alive(holder.pid))):
                lock.release()
                where = "which this host cannot check" if not holder.on_this_host else "and flock does not work here"
                raise MicrotrainError(f"run dir '{run_dir}' is locked by {holder}, {where}; if that process has ended, "
                                  f"delete '{path}' and repeat the command")
            return lock

    def take(self, command: str = "") -> None:
        """Record this process as the run dir's writer (for the messages other commands print)."""
        data = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": command}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(data) + "\n").encode(), 0)
        os.fsync(self.fd)
        self.taken = True

    def moved_to(self, run_dir: Path) -> None:
        """The run dir was renamed while locked (moved aside): the open file moved with it."""
        self.path = Path(run_dir) / LOCK_FILE

    def release(self, keep_original: bool = False) -> None:
        """Drop the flock. The file goes when this process made it or ran the run dir; with ``keep_original`` (a
        command that refused or failed before writing) a file found there is put back as it was, so a dead
        holder's record stays. Removing the file while still locked is safe: :meth:`acquire` checks that the
        file it locked is still the one at the path."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if _is_file_at(self.fd, self.path):
                if self.created or (self.taken and not keep_original):
                    os.unlink(self.path)
                elif self.taken:
                    os.ftruncate(self.fd, 0)
                    os.pwrite(self.fd, self.original, 0)
        os.close(self.fd)
        self.fd = -1


def _flock(fd: int, shared: bool = False) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock (NFS without locking).
    ``shared`` only probes: a shared lock is refused while a writer holds the exclusive one."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
            return None
        raise


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def live_holder(run_dir: Path) -> Holder | None:
    """The process writing ``run_dir`` now, without changing anything; None when no live process holds it.
    A holder on another host whose flock this host sees free counts as live: it cannot be checked from here."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        holder = _read_holder(fd)
        try:
            locked = _flock(fd, shared=True)
        except OSError:
            locked = None
        if locked is False:
            return holder or Holder(0, "?")
        if holder is not None and (not holder.on_this_host or (locked is None and _pid_alive(holder.pid))):
            return holder
        return None
    finally:
        os.close(fd)  # drops the probe's flock


def dead_holder(run_dir: Path) -> Holder | None:
    """The process named in ``run_dir``'s lock file when it ended without removing it (killed); else None."""
    path = Path(run_dir) / LOCK_FILE
    if live_holder(run_dir) is not None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RunStatus:
    """What a run dir's status.json says, corrected by its lock: ``running`` only while a live process holds it."""

    status: str  # running, completed, failed, interrupted, "" (no status.json)
    message: str
    recorded: str  # what status.json says


def run_status(run_dir: Path) -> RunStatus:
    """The run dir's status as it really is. A ``running`` left by a process that is gone (SIGKILL, power loss,
    a closed terminal before 0.2) reads as ``interrupted``, with a message that says so."""
    try:
        data = json.loads((Path(run_dir) / "status.json").read_text())
        recorded, message = str(data.get("status", "")), str(data.get("message", ""))
    except (OSError, ValueError, AttributeError):
        recorded, message = "", ""
    holder = live_holder(run_dir)
    if holder is not None:
        return RunStatus("running", f"in use by {holder}", recorded)
    if recorded == "running":
        dead = dead_holder(run_dir)
        who = f"its process (pid {dead.pid} on host {dead.host})" if dead else "its process"
        return RunStatus("interrupted", f"stopped without recording it: {who} is gone (killed, or the machine went "
                                        "down); status.json's 'running' is stale; the last checkpoint is kept", recorded)
    return RunStatus(recorded, message, recorded)


def holds_run(run_dir: Path) -> bool:
    """``run_dir`` holds (part of) a run that a new run would overwrite or mix with."""
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def aside_path(run_dir: Path) -> Path:
    """``<run dir>.replaced-<timestamp>`` (with -2, -3... when taken): where ``--force`` moves an old run."""
    run_dir = Path(run_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    number = 2
    while candidate.exists():
        candidate = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{number}")
        number += 1
    return candidate


def move_aside(run_dir: Path) -> Path:
    """Rename the whole run dir (one atomic rename: the old run stays whole, nothing is deleted)."""
    run_dir = Path(run_dir)
    target = aside_path(run_dir)
    try:
        os.rename(run_dir, target)
    except OSError as exc:
        raise MicrotrainError(f"--force: cannot move '{run_dir}' aside to '{target}' ({exc.strerror}); move or delete "
                              "it yourself, or pick another --run-dir") from None
    return target


def claim_new_dir(run_dir: Path) -> Path:
    """Create a fresh folder at ``run_dir``, or at ``run_dir-2``, ``-3``... when one is there (two runs started
    in the same second). mkdir is atomic: two processes never claim the same folder."""
    run_dir = Path(run_dir)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MicrotrainError(f"run dir '{run_dir}' is not writable ({exc.strerror}); pass --run-dir to a writable "
                              "folder") from None
    candidate, number = run_dir, 2
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            candidate, number = run_dir.with_name(f"{run_dir.name}-{number}"), number + 1
        except OSError as exc:
            raise MicrotrainError(f"run dir '{candidate}' is not writable ({exc.strerror}); pass --run-dir to a "
                                  "writable folder") from None


def _describe(run_dir: Path, previous: Holder | None) -> str:
    """'completed, 2 epochs logged' for the refusal line; the lock is held, so 'running' there is stale."""
    try:
        recorded = str(json.loads((run_dir / "status.json").read_text()).get("status", ""))
    except (OSError, ValueError, AttributeError):
        recorded = ""
    if recorded == "running":
        who = f"{previous.pid} on host {previous.host}" if previous else "that wrote it"
        recorded = f"stopped without recording it: status.json says running, but its process {who} is gone"
    try:
        epochs = sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        epochs = 0
    return ", ".join(filter(None, [recorded, f"{epochs} epoch(s) logged"]))


def _check_writable(run_dir: Path) -> None:
    try:
        probe = run_dir / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as exc:
        raise MicrotrainError(f"run dir '{run_dir}' is not writable ({exc.strerror}); pass --run-dir to a writable folder") from None


class OpenRunDir:
    """A run dir this process holds the lock of. Nothing in it changes until :meth:`commit` (called once the run is
    built and about to write): a command that refuses or fails before then leaves an existing run as it was and
    removes a folder it made."""

    def __init__(self, path: Path, lock: RunDirLock, created: bool, replace: bool):
        self.path, self.lock, self.created, self.replace = path, lock, created, replace
        self.committed = False

    @classmethod
    def open(cls, run_dir: Path | None, *, default: Path, resume: bool, force: bool) -> OpenRunDir:
        """Apply the run-dir rules: a new folder for a default run dir; the run's own folder for a resume; for
        ``--run-dir`` an empty or new folder, or, with ``force``, one whose run :meth:`commit` moves aside."""
        if run_dir is None:
            path = claim_new_dir(default)
            return cls._locked(path, created=True, replace=False)
        path = Path(run_dir)
        if resume:
            return cls._locked(path, created=False, replace=False)
        if path.exists() and not path.is_dir():
            raise MicrotrainError(f"--run-dir '{path}' is a file, not a folder; pass a folder for the run")
        created = not path.exists()
        if created:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise MicrotrainError(f"run dir '{path}' is not writable ({exc.strerror}); pass --run-dir to a "
                                      "writable folder") from None
        opened = cls._locked(path, created=created, replace=False)
        if holds_run(path):
            if not force:
                what = _describe(path, opened.lock.previous)
                opened.close()
                raise MicrotrainError(f"run dir '{path}' already holds a run ({what}); continue it with --resume {path}, or "
                                      f"add --force to move it aside (to '{path}.replaced-<time>') and start a new run in "
                                      f"'{path}'")
            if Path.cwd().resolve().is_relative_to(path.resolve()):
                opened.close()
                raise MicrotrainError(f"--force cannot move '{path}' aside: it holds the current folder; run from "
                                      "another folder or pick another --run-dir")
            opened.replace = True
        return opened

    @classmethod
    def _locked(cls, path: Path, *, created: bool, replace: bool) -> OpenRunDir:
        try:
            lock = RunDirLock.acquire(path)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        opened = cls(path, lock, created, replace)
        try:
            _check_writable(path)
        except BaseException:
            opened.close()
            raise
        return opened

    def commit(self, command: str) -> list[str]:
        """Make the run dir this run's: move an old run aside (``--force``) and record this process in the lock.
        Returns the lines to tell the user (where the old run went, a dead holder taken over)."""
        notes = []
        if self.lock.previous is not None and not self.replace:
            notes.append(f"'{self.path}' was left by {self.lock.previous}, which ended without saying so (killed?); "
                         "its lock and any 'running' in status.json were stale: taking over")
        if self.replace:
            aside = move_aside(self.path)
            self.lock.moved_to(aside)
            old_lock = self.lock
            try:
                self.path.mkdir()
                self.lock = RunDirLock.acquire(self.path)
            finally:
                old_lock.release(keep_original=True)  # the old run keeps its lock file exactly as it was
            self.created, self.replace = True, False
            notes.append(f"--force: moved the run that was in '{self.path}' to '{aside}'; starting a new run in "
                         f"'{self.path}'")
        self.lock.take(command)
        self.committed = True
        return notes

    def close(self) -> None:
        """Release the lock; before a commit, also undo what opening did (a folder it made, a lock file it took)."""
        self.lock.release(keep_original=not self.committed)
        if self.created and not self.committed:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only when empty: nothing else was written
