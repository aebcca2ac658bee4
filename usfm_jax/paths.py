"""Paths that may be local or in an object store (``gs://bucket/...``), through etils epath.

Reading or writing ``gs://`` needs ``gcsfs`` (epath) and, for TensorBoard events,
``google-cloud-storage`` (tensorboardX): ``requirements-gcs.txt``. Checkpoints reach GCS through
orbax's TensorStore without them.
"""

from __future__ import annotations

import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (orbax needs that), or a URL such as gs://... as it is."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


class PathError(OSError):
    """A path given on the command line that cannot serve; the message names the flag."""


def work_directory(path: str | os.PathLike, flag: str = "--workdir") -> epath.Path:
    """``as_path`` of a directory to write in (a run's ``--workdir``, an ``--output``): one
    that exists and is writable, or one that can be created."""
    root = as_path(path)
    name = os.fspath(path)
    if root.exists():
        if not root.is_dir():
            raise PathError(f"{flag} {name} is a file: give a directory")
        if "://" not in name and not os.access(root, os.W_OK | os.X_OK):
            raise PathError(f"{flag} {name} is not writable (read-only, or not yours)")
    else:
        _check_creatable(root, flag, name)
    return root


def new_directory(out: str | os.PathLike, flag: str = "--out") -> epath.Path:
    """``as_path`` of an output directory that does not exist yet or is empty (nothing is ever
    overwritten), checked before any work is done."""
    path = work_directory(out, flag)
    if path.exists() and any(path.iterdir()):
        raise PathError(f"{flag} {os.fspath(out)} exists and is not empty; choose another one")
    return path


def new_file(out: str | os.PathLike, flag: str = "--out") -> epath.Path:
    """``as_path`` of an output file that does not exist yet, in an existing directory."""
    name = os.fspath(out)
    path = as_path(out)
    if path.exists():
        raise PathError(f"{flag} {name} exists; choose another file name")
    _check_creatable(path, flag, name)
    if "://" not in name and not path.parent.exists():
        raise PathError(f"{flag} {name}: directory {path.parent} does not exist")
    return path


def make_directory(path: epath.Path, flag: str) -> None:
    """``path.mkdir(parents=True, exist_ok=True)``; a failure names the flag."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None


def _check_creatable(path: epath.Path, flag: str, name: str) -> None:
    """The nearest existing ancestor of a local ``path`` is a writable directory."""
    if "://" in name:
        return  # an object store: no parent directories, permissions are checked on write
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PathError(f"{flag} {name}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathError(f"{flag} {name}: cannot create it, {parent} is not writable")


def replace_text(path: epath.Path, text: str) -> None:
    """Writes ``path`` whole, through a temporary file: a kill midway leaves the old one."""
    temporary = path.parent / f"{path.name}.tmp"
    temporary.write_text(text)
    temporary.replace(path)
