"""The grain pre-training pipeline: shapes, determinism, disjoint per-process shards."""

import collections
import glob
import io
import itertools
import os
import shutil

import jax
import numpy as np
import PIL.Image
import pytest
from conftest import make_tiny_config

from usfm_jax import parallel
from usfm_jax.config_validation import ConfigError, validate
from usfm_jax.data.augment import center_resize
from usfm_jax.data.ingest import Options, ingest
from usfm_jax.data.mixing import DEFAULT_BLOCK_SIZE
from usfm_jax.data.pipeline import (
    create_pretrain_dataset,
    create_stream,
    global_batch,
    read_card,
)
from usfm_jax.data.synthetic import SyntheticUltrasound, generate
from usfm_jax.train import train


def _images(batches) -> list[bytes]:
    return [image.tobytes() for batch in batches for image in batch["image"]]


def _fingerprints(config, process_index: int, process_count: int, batches: int) -> list[bytes]:
    ds = create_pretrain_dataset(config, process_index=process_index, process_count=process_count)
    return _images(itertools.islice(iter(ds), batches))


def test_batches_have_the_configured_shape_and_type():
    config = make_tiny_config()
    batch = next(iter(create_pretrain_dataset(config, process_index=0, process_count=1)))
    assert batch["image"].shape == (16, 32, 48, 1) and batch["image"].dtype == np.uint8
    assert batch["organ"].shape == (16,)


def test_every_reader_thread_can_work(caplog):
    """Elements are whole batches: grain keeps at most ``prefetch_buffer_size`` in flight, so
    a buffer of ``data.prefetch`` batches below the thread count would idle threads (and grain
    says so)."""
    config = make_tiny_config(**{"data.num_threads": 4, "data.prefetch": 2})
    with caplog.at_level("WARNING"):
        next(iter(create_pretrain_dataset(config, process_index=0, process_count=1)))
    assert not [r for r in caplog.records if "smaller than num_threads" in r.getMessage()]


def test_stream_is_deterministic_and_reshuffled_each_epoch():
    config = make_tiny_config()
    config.data.num_images = 32  # two batches of 16 per epoch
    first = _fingerprints(config, 0, 1, 4)
    assert first == _fingerprints(config, 0, 1, 4)
    epoch1, epoch2 = first[:32], first[32:]
    assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == 32  # every image once
    assert epoch1 != epoch2  # in a new order


def test_processes_read_disjoint_slices_that_cover_the_data():
    config = make_tiny_config()
    config.data.num_images = 64
    shards = [_fingerprints(config, i, 4, 4) for i in range(4)]  # 4 x 4 batches of 4 = 64
    assert all(len(s) == 16 for s in shards)
    seen = [f for s in shards for f in s]
    assert len(set(seen)) == 64
    assert set(seen) == {SyntheticUltrasound(64, (32, 48))[i]["image"].tobytes() for i in range(64)}


def test_global_batches_do_not_depend_on_the_number_of_processes():
    config = make_tiny_config()
    one = _fingerprints(config, 0, 1, 2)  # two global batches of 16
    four = [_fingerprints(config, p, 4, 2) for p in range(4)]  # 2 x 4 rows per process
    for k in range(2):
        rows = [f for p in range(4) for f in four[p][4 * k : 4 * k + 4]]
        assert rows == one[16 * k : 16 * (k + 1)]


def test_batch_not_divisible_by_processes_is_rejected():
    config = make_tiny_config()
    with pytest.raises(ValueError, match="batch_size=16 is not divisible by the 3 processes"):
        create_pretrain_dataset(config, process_index=0, process_count=3)
    config.data.source = "dicom"
    with pytest.raises(ValueError, match=r"config\.data\.source='dicom'"):
        create_stream(config)


def test_global_batch_is_sharded_over_the_mesh():
    config = make_tiny_config()
    config.mesh.update(data=4, fsdp=2)
    mesh = parallel.create_mesh(config.mesh)
    local = next(iter(create_pretrain_dataset(config, process_index=0, process_count=1)))
    batch = global_batch(local, mesh)
    assert batch["image"].sharding.spec == parallel.batch_sharding(mesh).spec
    assert len(batch["image"].addressable_shards) == 8
    assert batch["image"].addressable_shards[0].data.shape == (2, 32, 48, 1)
    np.testing.assert_array_equal(jax.device_get(batch["image"]), local["image"])


COUNTS = {"breast": 1, "heart": 3, "kidney": 12, "liver": 40}


@pytest.fixture(scope="module")
def ingested_dir(tmp_path_factory) -> str:
    """A small ingested dataset with very uneven organ counts (synthetic PNG exports)."""
    root = tmp_path_factory.mktemp("exports")
    for organ_id, (organ, count) in enumerate(COUNTS.items()):
        (root / organ).mkdir()
        for i in range(count):
            image, _ = generate(11, 100 * organ_id + i, (80, 96), organ=organ_id % 6)
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format="PNG")
            (root / organ / f"{i}.png").write_bytes(buf.getvalue())
    out = tmp_path_factory.mktemp("tfds")
    card = ingest(str(root), str(out), "mix_test", Options(resize=0, crop="none"), workers=1)
    return card["data_dir"]


def _tfds_config(data_dir: str, **data):
    config = make_tiny_config(**{"data.source": "tfds", "data.tfds_dir": data_dir})
    config.data.update(data)
    return config


ORGAN_IDS = {organ: i for i, organ in enumerate(sorted(COUNTS))}  # the ingest's class labels
BLOCK = DEFAULT_BLOCK_SIZE  # the stream's organ mixture has exact organ counts per block


def _draws(config, batches: int) -> dict[str, np.ndarray]:
    """The first ``batches`` batches of a one-process stream, concatenated per key."""
    ds = create_pretrain_dataset(config, process_index=0, process_count=1)
    drawn = list(itertools.islice(iter(ds), batches))
    return {k: np.concatenate([b[k] for b in drawn]) for k in drawn[0]}


def _plain_views(data_dir: str, size: tuple[int, int]) -> dict[int, np.ndarray]:
    """Record index -> its stored PNG decoded by PIL and centre-resized to ``size``."""
    import tensorflow_datasets as tfds  # slow: only the ingested-data tests need it

    builder = tfds.builder_from_directory(data_dir)
    source = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    return {
        i: center_resize(np.asarray(PIL.Image.open(io.BytesIO(source[i]["image"]))), size)
        for i in range(len(source))
    }


def test_tfds_stream_augments_every_draw_afresh(ingested_dir):
    """With augmentation off each draw is its record's plain centre-resized view; with it on
    no draw is, and no two draws (of the same record among them) are alike."""
    config = _tfds_config(ingested_dir)
    plain = _plain_views(ingested_dir, tuple(config.image_size))
    off = _tfds_config(ingested_dir)  # a fixed crop at the output's aspect ratio, no tone change
    off.data.augment.update(
        crop_scale=(1.0, 1.0), crop_ratio=(1.5, 1.5), hflip=0.0, gamma=(1.0, 1.0),
        contrast=(1.0, 1.0),
    )  # fmt: skip
    drawn = _draws(off, 8)
    for image, index in zip(drawn["image"], drawn["index"], strict=True):
        np.testing.assert_array_equal(image[..., 0], plain[int(index)])

    drawn = _draws(config, 25)  # 400 draws: the 1-record breast about 100 times
    assert drawn["image"].shape == (400, 32, 48, 1) and drawn["image"].dtype == np.uint8
    assert max(collections.Counter(drawn["index"].tolist()).values()) >= 50
    for image, index in zip(drawn["image"], drawn["index"], strict=True):
        assert not np.array_equal(image[..., 0], plain[int(index)])
    assert len({image.tobytes() for image in drawn["image"]}) == 400


@pytest.mark.parametrize(
    "data, weights",
    [
        (dict(weighting="balanced"), dict.fromkeys(COUNTS, 1.0)),
        (dict(weighting="proportional"), COUNTS),
        (dict(weighting="temperature"), {o: n**0.5 for o, n in COUNTS.items()}),  # default t
        (dict(weighting="temperature", temperature=0.3), {o: n**0.3 for o, n in COUNTS.items()}),
        (
            dict(weighting="explicit", organ_weights="liver=2,breast=3,kidney=1,heart=0"),
            dict(breast=3, heart=0, kidney=1, liver=2),
        ),
    ],
    ids=["balanced", "proportional", "temperature-default", "temperature-0.3", "explicit"],
)
def test_tfds_stream_draws_the_organs_with_the_configured_weights(ingested_dir, data, weights):
    """Organ counts of the first n = 2048 draws against weights computed here from COUNTS:
    they lie in one mixing block of B = 65,536 elements that holds each organ in exact
    proportion (to a rounding that moves the mean by < n / B), so a count is hypergeometric
    (variance n p (1 - p) (B - n) / (B - 1)) and within 5 standard deviations of n p; an
    organ of weight 0 is never drawn."""
    drawn = _draws(_tfds_config(ingested_dir, **data), 128)
    card = read_card(ingested_dir)
    assert card["organs"] == sorted(COUNTS)  # organ i of the records = ORGAN_IDS
    for organ, (start, end) in card["organ_ranges"]["train"].items():  # labels match records
        of_organ = drawn["index"][drawn["organ"] == ORGAN_IDS[organ]]
        assert np.all((start <= of_organ) & (of_organ < end))
    n = len(drawn["organ"])
    p = np.array([weights[o] for o in sorted(COUNTS)], float)
    p /= p.sum()
    counts = np.bincount(drawn["organ"], minlength=len(COUNTS))
    sd = np.sqrt(n * p * (1 - p) * (BLOCK - n) / (BLOCK - 1))
    assert np.all(np.abs(counts - n * p) <= 5 * sd), (counts, n * p)


def test_temperature_one_is_proportional_and_zero_is_balanced(ingested_dir):
    """count ** t weighting: t = 1 and t = 0 draw the very same organs as the proportional and
    balanced weightings (the mixture is a pure function of the weights and the seed)."""

    def organs(**data) -> np.ndarray:
        return _draws(_tfds_config(ingested_dir, **data), 32)["organ"]

    proportional, balanced = organs(weighting="proportional"), organs(weighting="balanced")
    assert not np.array_equal(proportional, balanced)
    np.testing.assert_array_equal(organs(weighting="temperature", temperature=1.0), proportional)
    np.testing.assert_array_equal(organs(weighting="temperature", temperature=0.0), balanced)


@pytest.mark.parametrize("processes", [2, 4])
def test_tfds_streams_per_process_are_disjoint_blocks_of_the_global_batch(ingested_dir, processes):
    config = _tfds_config(ingested_dir)

    def batches(index: int, count: int) -> list[np.ndarray]:
        ds = create_pretrain_dataset(config, process_index=index, process_count=count)
        return [b["image"] for b in itertools.islice(iter(ds), 3)]

    one = batches(0, 1)
    parts = [batches(p, processes) for p in range(processes)]
    assert parts[0][0].shape[0] == 16 // processes
    for k in range(3):  # global batch k = the processes' blocks, in process order
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), one[k])
    assert [b.tobytes() for b in batches(1, processes)] == [b.tobytes() for b in parts[1]]


def test_restored_iterator_yields_the_same_batches(ingested_dir):
    config = _tfds_config(ingested_dir)
    it = iter(create_pretrain_dataset(config, process_index=0, process_count=1))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["image"] for _ in range(2)]
    restored = iter(create_pretrain_dataset(config, process_index=0, process_count=1))
    restored.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(restored)["image"], want)


def test_missing_dataset_is_a_clear_error(tmp_path):
    config = _tfds_config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"config\.data\.tfds_dir=.*dataset_card\.json"):
        create_stream(config)


def test_validation_checks_the_tfds_settings(ingested_dir, tmp_path):
    validate(_tfds_config(ingested_dir), num_devices=1)
    validate(_tfds_config(ingested_dir, weighting="temperature", temperature=0.3), num_devices=1)
    cases = [
        (dict(tfds_dir=str(tmp_path)), r"config\.data\.tfds_dir=.*no dataset_card\.json"),
        (dict(split="val"), r"config\.data\.split='val': the dataset has \['train'\]"),
        (dict(weighting="uniform"), r"config\.data\.weighting='uniform'"),
        (dict(weighting="explicit", organ_weights="liver=1"), r"config\.data\.organ_weights"),
        (dict(organ_weights="liver:1"), r"config\.data: config\.data\.organ_weights"),
        (dict(organ_weights="liver=1,liver=2"), r"'liver' is given twice"),
        (  # weighting stays "balanced": the weights would be ignored
            dict(organ_weights="liver=2"),
            r"config\.data\.organ_weights='liver=2': is used only with data\.weighting='explicit'",
        ),
        (  # weighting stays "balanced": the temperature would be ignored
            dict(temperature=0.3),
            r"config\.data\.temperature=0\.3: is used only with data\.weighting='temperature'",
        ),
        (dict(weighting="temperature", temperature=-1.0), r"config\.data\.temperature=-1\.0"),
        (dict(worker_count=-1), r"config\.data\.worker_count=-1"),
    ]
    for data, match in cases:
        with pytest.raises(ConfigError, match=match):
            validate(_tfds_config(ingested_dir, **data), num_devices=1)


def test_sampling_settings_are_checked_for_the_synthetic_source_too():
    """The synthetic source reads neither the organ weighting nor the augmentation: a bad value
    is named as for ingested data, a changed one is refused rather than silently unused."""
    validate(make_tiny_config(), num_devices=8)
    cases = [
        ({"data.weighting": "bogus"}, r"config\.data\.weighting='bogus': expected one of"),
        ({"data.augment.hflip": 7.0}, r"config\.data: hflip=7\.0: expected a probability"),
        ({"data.organ_weights": "liver=2"}, r"organ_weights='liver=2': is used only with data"),
        ({"data.weighting": "proportional"},
         r"data\.weighting='proportional': is read only from ingested data \(data\.source='tfds'"),
        ({"data.augment.gamma": (1.0, 1.0)}, r"data\.augment\.gamma=\(1\.0, 1\.0\): is read"),
    ]  # fmt: skip
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            validate(make_tiny_config(**overrides), num_devices=8)


def test_probes_need_two_organs_in_their_split(tmp_path):
    """The probes classify organs: on a one-organ split every probe scores 1.0, so it is
    refused before training."""
    (tmp_path / "exports" / "liver").mkdir(parents=True)
    for i in range(12):
        image, _ = generate(3, i, (64, 64), organ=1)
        PIL.Image.fromarray(image).save(tmp_path / "exports" / "liver" / f"{i}.png")
    card = ingest(str(tmp_path / "exports"), str(tmp_path / "tfds"), "one", Options(resize=0,
                  crop="none"), workers=1)  # fmt: skip
    config = _tfds_config(card["data_dir"])
    config.probe.update(every=2, split="train", num_train=4, num_test=4)
    with pytest.raises(ConfigError, match=r"probe\.split='train': holds one organ \(liver\)"):
        validate(config, num_devices=8)
    config.probe.every = 0
    validate(config, num_devices=8)


@pytest.mark.parametrize("damage", ["card", "missing shard", "cut shard"])
def test_a_damaged_dataset_is_a_config_error_naming_the_file(ingested_dir, tmp_path, damage):
    data_dir = tmp_path / "copy"
    shutil.copytree(ingested_dir, data_dir)
    [shard] = glob.glob(str(data_dir / "*-train.array_record-*"))
    if damage == "card":
        (data_dir / "dataset_card.json").write_text('{"organ_ranges": ')
        match = r"dataset_card\.json: not a dataset card \(Expecting value"
    elif damage == "missing shard":
        os.remove(shard)
        match = rf"{os.path.basename(shard)} \(train split\) is missing; re-run"
    else:
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
        match = rf"{os.path.basename(shard)} \(train split\) is unreadable \("
    with pytest.raises(ConfigError, match=match):
        validate(_tfds_config(str(data_dir)), num_devices=1)


def test_training_reads_an_ingested_dataset(ingested_dir, tmp_path):
    config = _tfds_config(ingested_dir)
    means = train(config, str(tmp_path))
    assert np.isfinite(means["loss"]) and means["loss_spatial"] > 0


@pytest.mark.usefixtures("grain_worker_processes")
def test_worker_processes_yield_the_same_batches():
    config = make_tiny_config()
    threads = _fingerprints(config, 0, 1, 3)
    config.data.worker_count = 2
    it = iter(create_pretrain_dataset(config, process_index=0, process_count=1))
    try:
        workers = [image.tobytes() for b in itertools.islice(it, 3) for image in b["image"]]
    finally:
        it.close()
    assert workers == threads


def test_a_stream_opened_at_a_step_starts_at_that_global_batch():
    config = make_tiny_config()
    for process_count in (1, 2):
        from_start = _fingerprints(config, process_count - 1, process_count, 5)
        ds = create_pretrain_dataset(
            config, process_index=process_count - 1, process_count=process_count, start_step=3
        )
        rows = config.batch_size // process_count
        later = _images(itertools.islice(iter(ds), 2))
        assert later == from_start[3 * rows : 5 * rows]  # batches 3 and 4 of this process
