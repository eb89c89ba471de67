"""Output directories that never cost a user a file: built aside, renamed into place, and owned.

Every command that writes a directory (hive-export-vision, hive-train's stages, hive-eval-tasks, the toy
writers, hive-reproduce, the examples) goes through here:

- the directory is built in a temporary sibling (`.NAME.partial`), `fsync`ed, and renamed into place (an existing
  one swapped atomically, `install`), so a kill or a power loss at any moment leaves the old state or the new one
  at the target, never a half-written directory (without an atomic swap, the one moment the target is missing is
  put right by the command's next run: `recover_install`);
- it carries an ownership file (`.hive-adapter.json`: which command wrote it), so a later run tells its own
  output from anybody else's;
- an existing target is replaced only when it is empty, or when the same command wrote it and the caller
  allows replacing; anything else is refused, naming the path and what to do. Nothing is ever deleted that
  does not carry the ownership file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
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
    recover_install(target, command=command)
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
    """Remove what a killed run of `command` left in `partial_path(target)` (only if it is ours; an install cut
    short is recovered first); return the path."""
    recover_install(target, command=command)
    partial = partial_path(target)
    if partial.is_dir() and not partial.is_symlink() and not any(partial.iterdir()):
        partial.rmdir()  # an empty target an install swapped out before it was killed
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


def sync_tree(directory: Path) -> None:
    """`fsync` every file and directory under `directory` (itself included): after a power loss the renamed
    directory holds what was written, not empty files."""
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_directory(Path(root))


def sync_directory(directory: Path) -> None:
    """`fsync` a directory's entries (a rename in it is durable afterwards); a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the platform
    or filesystem has no such call (the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        return False
    raise OSError(error, f"cannot exchange {first} and {second}: {os.strerror(error)}")


def previous_path(target: Path) -> Path:
    """Where the two-rename fallback of `install` keeps the old target while the new one is renamed in."""
    target = Path(target)
    return target.with_name(f".{target.name}.previous")


def recover_install(target: Path, *, command: str) -> None:
    """Finish what an install killed between its two renames (the fallback without an atomic exchange) left:
    the target missing and its old content, ours, in `.NAME.previous`. The old content goes back; the
    new output, unfinished as far as anyone can tell, is cleared with the partial directory. Every write of
    `command` to `target` runs this first."""
    target = Path(target)
    if not target.name:  # "." or "/": an existing directory, never one an install put in place
        return
    previous = previous_path(target)
    if not previous.is_dir() or owner_of(previous) != command:
        return
    if target.exists() or target.is_symlink():
        logger.info("removing %s, the old output an interrupted install left", previous)
        shutil.rmtree(previous)
        return
    logger.warning("%s was missing (an install was interrupted); putting its earlier output back", target)
    os.replace(previous, target)
    sync_directory(target.parent)


def install(partial: Path, target: Path, *, command: str) -> None:
    """Rename a finished `partial` to `target`; an existing target (empty, or ours: checked before) goes.

    Everything under `partial` is `fsync`ed first, and the parent after the rename. An existing target is swapped
    with `partial` in one atomic step where the platform has one (Linux `renameat2(RENAME_EXCHANGE)`): at every
    moment `target` holds the old output or the new one, and a kill after the swap leaves the old one in
    `partial`, which the next run clears. Elsewhere the old target is renamed to `.NAME.previous` first; a kill
    between that and the second rename leaves `target` missing until the next run of `command` puts the old
    output back (`recover_install`)."""
    target = Path(target)
    if target.is_symlink():
        raise OutputRefused(f"{target} is a symbolic link; give the directory it points to, or a new path")
    sync_tree(partial)
    if not target.exists():
        os.replace(partial, target)
        sync_directory(target.parent)
        return
    if any(target.iterdir()) and owner_of(target) != command:  # checked by the caller; never delete others' files
        raise OutputRefused(f"{target} appeared while {command} was writing it; {partial} holds the new output")
    if exchange(partial, target):
        sync_directory(target.parent)
        shutil.rmtree(partial)  # the old output, now at the partial path
        return
    previous = previous_path(target)
    if previous.exists() and owner_of(previous) == command:
        shutil.rmtree(previous)
    os.replace(target, previous)
    os.replace(partial, target)
    sync_directory(target.parent)
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
