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


def replace_text(path: epath.Path, text: str) -> None:
    """Writes ``path`` whole, through a temporary file: a kill midway leaves the old one."""
    temporary = path.parent / f"{path.name}.tmp"
    temporary.write_text(text)
    temporary.replace(path)
