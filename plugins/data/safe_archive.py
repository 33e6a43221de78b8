"""Extract downloaded tar archives without letting a member escape the target folder."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from microtrain import DataError


def _inside(base: Path, target: Path) -> bool:
    return os.path.commonpath([base, target]) == str(base)


def check_members(archive: tarfile.TarFile, target: Path) -> None:
    """Refuse absolute paths, '..' members, device files and links that point outside ``target``.

    Link targets may not climb with '..' either: 'x -> d/..' looks inside on paper but leaves the folder once
    an earlier member made 'd' a link to '.'. With no '..' and no absolute target, every link points below
    its own folder, so no chain of links can escape. (tarfile's 'data' filter then checks again.)"""
    base = target.resolve()
    for member in archive.getmembers():
        name = member.name
        where = (base / name).resolve()
        if os.path.isabs(name) or ".." in Path(name).parts or not _inside(base, where):
            raise DataError(f"refusing archive member '{name}': it would be written outside {target}")
        if member.issym() or member.islnk():
            link = Path(member.linkname)
            resolved = (where.parent / link).resolve() if member.issym() else (base / link).resolve()
            if link.is_absolute() or ".." in link.parts or not _inside(base, resolved):
                raise DataError(f"refusing archive member '{name}': link to '{member.linkname}' may leave {target}")
        elif not (member.isfile() or member.isdir()):
            raise DataError(f"refusing archive member '{name}': not a regular file or folder")


def extract_tar_safely(archive_path: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive_path) as archive:
            check_members(archive, target)
            archive.extractall(target, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot extract {archive_path.name}: {exc}; the archive is corrupt, delete it and download "
                        "again") from None
