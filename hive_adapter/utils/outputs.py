"""Output directories that never cost a user a file: built aside, renamed into place, and owned.

Every command that writes a directory (hive-export-vision, hive-train's stages, hive-eval-tasks, the toy
writers, hive-reproduce, the examples) goes through here:

- the directory is built in a temporary sibling (`.NAME.partial`) and renamed into place, so a kill at any
  moment leaves the old state or the new one at the target, never a half-written directory;
- it carries an ownership file (`.hive-adapter.json`: which command wrote it), so a later run tells its own
  output from anybody else's;
- an existing target is replaced only when it is empty, or when the same command wrote it and the caller
  allows replacing; anything else is refused, naming the path and what to do. Nothing is ever deleted that
  does not carry the ownership file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

OWNER_FILE = ".hive-adapter.json"


class OutputRefused(ValueError):
    """A target path the command will not write to (it would overwrite or delete someone else's files)."""


def write_owner(directory: Path, command: str) -> None:
    (directory / OWNER_FILE).write_text(json.dumps({"written_by": command}) + "\n")


def owner_of(directory: Path) -> str | None:
    """The command that wrote `directory` (its ownership file), or None."""
    try:
        return json.loads((directory / OWNER_FILE).read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def check_target(
    target: Path, *, command: str, replace: bool = False, protect: Sequence[Path] = (), replace_flag: str = ""
) -> None:
    """Raise `OutputRefused` unless `command` may write `target`: new, empty, or its own earlier output (with
    `replace`). `protect`: paths that must survive (e.g. the input the output is made from)."""
    target = Path(target)
    if target.is_symlink():
        raise OutputRefused(f"{target} is a symbolic link; give the directory it points to, or a new path")
    if target.exists() and not target.is_dir():
        raise OutputRefused(f"{target} is a file, not a directory; give a directory path for the output")
    for path in protect:
        if target.exists() and _inside(Path(path), target):
            raise OutputRefused(f"{target} holds {path}, which this command reads; write the output somewhere else")
    if not target.is_dir() or not any(target.iterdir()):
        return
    owner = owner_of(target)
    if owner != command:
        raise OutputRefused(
            f"{target} is not empty and was not written by {command} "
            f"({'it was written by ' + owner if owner else 'it holds other files'}); choose a new or empty directory"
        )
    if not replace:
        how = f": pass {replace_flag} to replace it" if replace_flag else ""
        raise OutputRefused(f"{target} holds an earlier output of {command}{how}")


def partial_path(target: Path) -> Path:
    """The temporary sibling a directory is built in before it is renamed to `target`."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial")


def clear_partial(target: Path, *, command: str) -> Path:
    """Remove what a killed run of `command` left in `partial_path(target)` (only if it is ours); return the path."""
    partial = partial_path(target)
    if partial.exists():
        if not partial.is_dir() or owner_of(partial) != command:
            raise OutputRefused(
                f"{partial} is in the way of {target} and was not written by {command}; move it away and rerun"
            )
        logger.info("removing %s, left by an interrupted run", partial)
        shutil.rmtree(partial)
    return partial


def start_partial(target: Path, *, command: str) -> Path:
    """A fresh, owned temporary sibling for `target` (a stale one of ours is removed first)."""
    partial = clear_partial(target, command=command)
    partial.mkdir(parents=True)
    write_owner(partial, command)
    return partial


def install(partial: Path, target: Path, *, command: str) -> None:
    """Rename a finished `partial` to `target`; an existing target (empty, or ours: checked before) goes."""
    target = Path(target)
    if target.is_symlink():
        raise OutputRefused(f"{target} is a symbolic link; give the directory it points to, or a new path")
    if not target.exists():
        os.replace(partial, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.replace(partial, target)
        return
    if owner_of(target) != command:  # checked by the caller already; never delete anybody else's files
        raise OutputRefused(f"{target} appeared while {command} was writing it; {partial} holds the new output")
    previous = target.with_name(f".{target.name}.previous")
    if previous.exists() and owner_of(previous) == command:
        shutil.rmtree(previous)
    os.replace(target, previous)
    os.replace(partial, target)
    shutil.rmtree(previous)


@contextmanager
def staged_directory(
    target: str | os.PathLike,
    *,
    command: str,
    replace: bool = False,
    protect: Sequence[Path] = (),
    replace_flag: str = "",
) -> Iterator[Path]:
    """Write a directory safely: `with staged_directory(out, command="hive-export-vision") as tmp: ...` fills
    `tmp`; on success it becomes `out`, on an error it is removed and `out` is untouched."""
    target = Path(target)
    check_target(target, command=command, replace=replace, protect=protect, replace_flag=replace_flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = start_partial(target, command=command)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    install(partial, target, command=command)


def output_file(path: str | os.PathLike) -> Path:
    """A file path to write to: refused if it is a directory; its parent directories are made."""
    path = Path(path)
    if path.is_dir():
        raise OutputRefused(f"{path} is a directory; give a file name for the output (e.g. {path / 'result'}...)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` into a temporary sibling, then rename it to `path`: a kill mid-write never leaves a
    half-written file, and an error leaves no temporary one."""
    path = output_file(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
