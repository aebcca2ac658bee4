"""The streaming ArrayRecord writer: shards rolled by size, read back by TFDS as written."""

import io
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from usfm_jax.data import records

FEATURES = tfds.features.FeaturesDict(
    {
        "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "organ": tfds.features.ClassLabel(names=["kidney", "liver"]),
        "note": tfds.features.Text(),
        "frame": np.int32,
    }
)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(image[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def _examples(count: int) -> list[dict]:
    """Examples as the ingest gives them (PNG bytes; TFDS encodes arrays through TensorFlow)."""
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (20, 30 + i, 1), dtype=np.uint8),
            "organ": ["kidney", "liver"][i % 2],
            "note": f"example {i}",
            "frame": i,
        }
        for i in range(count)
    ]


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_a_split_rolls_into_shards_on_disk_as_it_goes_and_reads_back_in_order(tmp_path):
    encode = records.Encoder(FEATURES)
    examples = _examples(10)
    encoded = [encode({**e, "image": _png(e["image"])}) for e in examples]
    shard_bytes = sum(len(e) for e in encoded[:3])  # the 3rd example of a shard closes it
    with records.SplitWriter(str(tmp_path), "demo", "train", shard_bytes) as shards:
        for i, example in enumerate(encoded):
            shards.write(example)
            if i == 6:  # two shards closed, complete on disk, while the split is being written
                closed = sorted(f for f in _files(tmp_path) if f.endswith(".partial"))
                assert closed == [".train-00000.partial", ".train-00001.partial",
                                  ".train-00002.partial"]  # fmt: skip
                assert shards.shard_lengths == [3, 3, 1]
                first = array_record_module.ArrayRecordReader(str(tmp_path / closed[0]))
                assert first.read_all() == encoded[:3]
    names = [f"demo-train.array_record-{i:05d}-of-00004" for i in range(4)]
    assert _files(tmp_path) == names
    assert shards.info.shard_lengths == [3, 3, 3, 1]
    assert shards.info.num_bytes == sum(len(e) for e in encoded)
    with records.SplitWriter(str(tmp_path), "demo", "val") as val:
        val.write(encoded[0])
    records.write_metadata(str(tmp_path), FEATURES, [shards.info, val.info], "test", "1.0.0")

    builder = tfds.builder_from_directory(str(tmp_path))
    assert builder.info.splits["train"].shard_lengths == [3, 3, 3, 1]
    source = builder.as_data_source("train")
    assert len(source) == 10
    for i, expected in enumerate(examples):
        got = source[i]
        np.testing.assert_array_equal(got["image"], expected["image"])
        assert FEATURES["organ"].int2str(got["organ"]) == expected["organ"]
        assert got["note"].decode() == expected["note"] and got["frame"] == i
    np.testing.assert_array_equal(builder.as_data_source("val")[0]["image"], examples[0]["image"])


def test_a_split_without_examples_leaves_no_file(tmp_path):
    with records.SplitWriter(str(tmp_path), "demo", "test") as shards:
        pass
    assert shards.info is None and _files(tmp_path) == []


def test_a_split_stopped_by_an_error_leaves_no_file_a_reader_takes(tmp_path):
    encoded = records.Encoder(FEATURES)({**_examples(1)[0], "image": b"PNG bytes"})
    with pytest.raises(KeyboardInterrupt), records.SplitWriter(str(tmp_path), "demo", "train") as s:
        s.write(encoded)
        raise KeyboardInterrupt
    assert s.info is None and _files(tmp_path) == [".train-00000.partial"]


def test_a_failed_write_names_the_file_and_the_cause(tmp_path):
    encoded = records.Encoder(FEATURES)({**_examples(1)[0], "image": b"PNG bytes"})
    missing = tmp_path / "gone"
    with (
        pytest.raises(records.WriteError, match=rf"cannot write {missing}/\.val-00000\.partial: "
                      r".*No such file or directory"),
        records.SplitWriter(str(missing), "demo", "val") as shards,
    ):  # fmt: skip
        shards.write(encoded)
    # a full disk: the shard's file is /dev/full, where every write fails with ENOSPC
    with (
        pytest.raises(records.WriteError, match="No space left on device"),
        records.SplitWriter(str(tmp_path), "demo", "val") as shards,
    ):
        os.symlink("/dev/full", tmp_path / ".val-00000.partial")
        shards.write(encoded)
    assert shards.info is None
    with pytest.raises(ValueError, match="shard_bytes must be > 0, got 0"):
        records.SplitWriter(str(tmp_path), "demo", "val", 0)
