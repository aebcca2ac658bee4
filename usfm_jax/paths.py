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


def work_directory(path: str | os.PathLike) -> epath.Path:
    """``as_path`` of a run's ``--workdir``, refused when it names a file."""
    root = as_path(path)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--workdir {os.fspath(path)} is a file: give a directory")
    return root


def new_directory(out: str | os.PathLike, flag: str = "--out") -> epath.Path:
    """``as_path`` of an output directory that does not exist yet or is empty (nothing is ever
    overwritten), checked before any work is done; an OSError says what is wrong with it."""
    name = os.fspath(out)
    path = as_path(out)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{flag} {name} is a file; give a new directory")
        if any(path.iterdir()):
            raise FileExistsError(f"{flag} {name} exists and is not empty; choose another one")
        return path
    if "://" in name:
        return path  # an object store: there are no parent directories to check
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {name}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {name}: cannot create it, {parent} is not writable")
    return path


def replace_text(path: epath.Path, text: str) -> None:
    """Writes ``path`` whole, through a temporary file: a kill midway leaves the old one."""
    temporary = path.parent / f"{path.name}.tmp"
    temporary.write_text(text)
    temporary.replace(path)
