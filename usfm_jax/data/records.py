"""A TFDS ArrayRecord dataset written as a stream: examples go to disk as they come, in order,
into shards rolled by size, so memory stays flat however many images a split holds.

TFDS's own builder buffers a whole split before writing it (and moves one past 1000 MiB to
temporary files through TensorFlow, which is not installed here); it also refuses a split that
receives no example, which is known only at its end. Here a split is written by
``SplitWriter`` and described by ``write_metadata``; the result is what
``tfds.builder_from_directory(...).as_data_source(split)`` reads, exactly as if TFDS had built
it (same file names, same serialized examples, one record per ArrayRecord group).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import example_serializer

SHARD_BYTES = 512 << 20  # a shard is closed once it holds this many bytes of examples
SUFFIX = "array_record"
# TFDS's: one record a group, so that any record is read alone (random access for grain)
WRITER_OPTIONS = "group_size:1"


class WriteError(OSError):
    """A shard could not be written (no space left, no permission, ...)."""


class Encoder:
    """Example dicts -> the bytes TFDS stores for ``features`` (a serialized tf.train.Example,
    made without TensorFlow)."""

    def __init__(self, features: tfds.features.FeaturesDict):
        self.features = features
        self._serializer = example_serializer.ExampleSerializer(features.get_serialized_info())

    def __call__(self, example: dict[str, Any]) -> bytes:
        return self._serializer.serialize_example(self.features.encode_example(example))


class SplitWriter:
    """Writes one split's serialized examples, in the order given, into ArrayRecord shards of
    about ``shard_bytes``; a context manager. On a clean exit the shards take TFDS's names
    (``NAME-SPLIT.array_record-00000-of-00003``) and ``info`` describes them; a split that got
    no example leaves no file and ``info`` None. After an error the partial shards stay, under
    names no reader takes for a split's (the caller removes its staging directory)."""

    def __init__(self, directory: str, dataset: str, split: str,
                 shard_bytes: int = SHARD_BYTES):  # fmt: skip
        if shard_bytes <= 0:
            raise ValueError(f"shard_bytes must be > 0, got {shard_bytes}")
        self.template = tfds.core.ShardedFileTemplate(
            data_dir=epath.Path(directory), dataset_name=dataset, split=split,
            filetype_suffix=SUFFIX,
        )  # fmt: skip
        self.shard_bytes = shard_bytes
        self.shard_lengths: list[int] = []  # examples per shard, closed shards and the open one
        self.num_bytes = 0  # of serialized examples, as TFDS counts a split's size
        self.info: tfds.core.SplitInfo | None = None
        self._writer = None  # of the open shard
        self._path = ""  # the open shard's file
        self._open_bytes = 0  # bytes written into the open shard

    def _partial(self, index: int) -> str:
        return os.fspath(self.template.data_dir / f".{self.template.split}-{index:05d}.partial")

    def write(self, example: bytes) -> None:
        """Appends one serialized example (``Encoder``'s output) to the split."""
        if self._writer is None:
            self._path = self._partial(len(self.shard_lengths))
            self._writer = _checked(self._path, array_record_module.ArrayRecordWriter,
                                    self._path, WRITER_OPTIONS)  # fmt: skip
            self.shard_lengths.append(0)
            self._open_bytes = 0
        _checked(self._path, self._writer.write, example)
        self.shard_lengths[-1] += 1
        self._open_bytes += len(example)
        self.num_bytes += len(example)
        if self._open_bytes >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            _checked(self._path, writer.close)

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:
            if self._writer is not None:  # its file is left to the caller, but not held open
                with contextlib.suppress(RuntimeError):  # the error in flight says more
                    self._writer.close()
            return
        self._close_shard()
        if not self.shard_lengths:
            return
        names = self.template.sharded_filepaths(len(self.shard_lengths))
        for index, name in enumerate(names):
            os.replace(self._partial(index), os.fspath(name))
        self.info = tfds.core.SplitInfo(
            name=self.template.split, shard_lengths=self.shard_lengths,
            num_bytes=self.num_bytes, filename_template=self.template,
        )  # fmt: skip


def _checked(path: str, call, *args):
    """``call(*args)``, ArrayRecord's RuntimeError for ``path`` raised as a WriteError."""
    try:
        return call(*args)
    except RuntimeError as e:
        raise WriteError(f"cannot write {path}: {e}") from e


def write_metadata(
    directory: str,
    features: tfds.features.FeaturesDict,
    splits: list[tfds.core.SplitInfo],
    description: str,
    version: str,
) -> None:
    """Writes the files TFDS reads a dataset's structure from (dataset_info.json, features.json,
    label names) beside the shards of ``splits``; records keep the order they were written in."""
    tfds.folder_dataset.write_metadata(
        data_dir=directory, features=features, split_infos=splits, version=version,
        check_data=False,  # TFDS's check reads through tf.data; the caller reads it back instead
        description=description, disable_shuffling=True,
    )  # fmt: skip
