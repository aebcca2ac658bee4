"""The jitted, sharded train step: device-count invariance, FSDP, gradient accumulation."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_tiny_config
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.pretrain import usfm_vitl16
from usfm_jax import parallel
from usfm_jax.config_validation import validate
from usfm_jax.data.pipeline import create_pretrain_dataset, global_batch
from usfm_jax.models.factory import create_encoder
from usfm_jax.objectives.dual import BRANCHES, create_objective
from usfm_jax.optim import create_optimizer, decay_mask, learning_rate_schedule
from usfm_jax.train_step import create_training, init_state, state_initializer


def _run(config, devices, steps: int = 3):
    """Runs ``steps`` steps on ``devices``; returns (per-step metrics, final params, state)."""
    mesh = parallel.create_mesh(config.mesh, devices)
    _, _, state, step_fn, _ = create_training(config, mesh)
    data = iter(create_pretrain_dataset(config, process_index=0, process_count=1))
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, global_batch(next(data), mesh))
        history.append(jax.device_get(metrics))
    return history, jax.device_get(state.params), state


def _assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6)


def _first_images(config) -> np.ndarray:
    """The first global batch's images (uint8), as ``_run`` feeds them."""
    return next(iter(create_pretrain_dataset(config, process_index=0, process_count=1)))["image"]


def _reference_loss(config, graphdef, params, images, step: int):
    """The pixel loss of step ``step`` recomputed outside the step: (total, per-branch sums,
    gradient norm). Its key is fold_in(key(config.seed), step), split into the views' key and
    the dropout key (whose first half is the pixel branch's)."""
    objective = create_objective(config)
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    k_views, k_drop = jax.random.split(key)
    views = objective.views(jnp.asarray(images, jnp.float32) / 255.0, k_views, jnp.int32(step))

    def loss_fn(params):
        pred = nnx.merge(graphdef, params)(
            views.inputs, views.token_mask, dropout_key=jax.random.split(k_drop)[0]
        )
        return objective.loss(pred, views, objective.branch_counts(views))

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, sums, optax.tree.norm(grads)


def test_eight_devices_match_one_device():
    assert jax.device_count() == 8
    config = make_tiny_config()
    one, params_one, _ = _run(config, jax.devices()[:1])
    config.mesh.update(data=4, fsdp=2, fsdp_min_size=1024)
    eight, params_eight, state = _run(config, jax.devices())
    fc1 = state.params["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]  # [32, 128]: sharded
    assert fc1.sharding.spec == P(None, "fsdp") and len(fc1.sharding.device_set) == 8
    for m1, m8 in zip(one, eight, strict=True):
        for name in ("loss", "loss_spatial", "loss_frequency", "grad_norm"):
            np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5)
    _assert_close(params_eight, params_one, rtol=1e-5)
    assert one[-1]["loss"] != one[0]["loss"]  # the step really trains


def test_three_axis_mesh_matches_one_device():
    """dcn x data x fsdp = 2 x 2 x 2 (two 'slices') gives the single-device losses."""
    config = make_tiny_config()
    one, params_one, _ = _run(config, jax.devices()[:1], steps=2)
    config.mesh.update(dcn=2, data=2, fsdp=2, fsdp_min_size=1024)
    eight, params_eight, state = _run(config, jax.devices(), steps=2)
    assert dict(state.params["encoder"]["norm"]["scale"].sharding.mesh.shape) == {
        "dcn": 2,
        "data": 2,
        "fsdp": 2,
    }
    for m1, m8 in zip(one, eight, strict=True):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    _assert_close(params_eight, params_one, rtol=1e-5)


@pytest.mark.parametrize("slices, dcn", [(1, 2), (2, 1), (2, 4)])
def test_dcn_other_than_the_tpu_slice_count_is_named(slices, dcn):
    """On TPUs the dcn axis is the slices (a hybrid mesh); any other size would fail inside
    JAX's mesh construction."""
    devices = [
        SimpleNamespace(id=i, platform="tpu", process_index=0, slice_index=i * slices // 8)
        for i in range(8)
    ]
    config = make_tiny_config(**{"mesh.dcn": dcn, "mesh.data": -1})
    with pytest.raises(parallel.MeshError, match=rf"dcn={dcn}: the devices form {slices} TPU "
                       rf"slice\(s\) .* set --config\.mesh\.dcn={slices}$"):  # fmt: skip
        parallel.create_mesh(config.mesh, devices)


def test_processes_with_unequal_device_counts_are_named():
    devices = [SimpleNamespace(id=i, platform="cpu", process_index=int(i >= 4)) for i in range(6)]
    with pytest.raises(parallel.MeshError, match=r"different numbers of devices \(\{0: 4, 1: 2\}"):
        parallel.create_mesh(make_tiny_config(**{"mesh.data": -1}).mesh, devices)


def test_fsdp_misses_are_the_large_arrays_no_dimension_of_which_divides():
    tree = {
        "qkv": jax.ShapeDtypeStruct((1024, 3072), np.float32),  # 3072 divides by 6
        "fc1": jax.ShapeDtypeStruct((1024, 4096), np.float32),  # nothing does
        "bias": jax.ShapeDtypeStruct((4096,), np.float32),  # too small to shard
    }
    total = 1024 * 3072 + 1024 * 4096 + 4096
    assert parallel.fsdp_misses(tree, 6, min_size=2**16) == pytest.approx(1024 * 4096 / total)
    assert parallel.fsdp_misses(tree, 5, min_size=2**16) == pytest.approx(1024 * 7168 / total)
    assert parallel.fsdp_misses(tree, 8, min_size=2**16) == 0
    assert parallel.fsdp_misses(tree, 1, min_size=2**16) == 0


def test_fsdp_shards_large_weights_only():
    config = make_tiny_config()
    config.mesh.update(data=1, fsdp=8)
    mesh = parallel.create_mesh(config.mesh)
    tx, _ = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    _, state, _ = init_state(config, tx, mesh)
    assert parallel.fsdp_spec((4096, 64), 8, min_size=1024) == P("fsdp", None)
    assert parallel.fsdp_spec((100,), 8, min_size=1024) == P()
    assert parallel.fsdp_spec((3, 5000), 8, min_size=1024) == P(None, "fsdp")
    adam_mu = state.opt_state[1][0].mu["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(adam_mu.shape, (32, 128))
    # optimizer moments take the sharding of their parameter: the rule depends on shape only
    assert adam_mu.sharding.spec == parallel.fsdp_spec(adam_mu.shape, 8, min_size=2**16)
    assert parallel.state_shardings(adam_mu, mesh, min_size=1024).spec == P(None, "fsdp")


def test_clipping_limits_the_global_norm_and_zero_turns_it_off():
    """The chain has the same structure with clipping on or off (a resumed run may change
    it); clip_norm=0 is AdamW itself, clip_norm=c scales the gradient to norm c first."""
    config = make_tiny_config()
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    grads = {"w": jnp.full((4, 3), 1e3), "b": jnp.full((3,), -2e3)}
    norm = float(optax.tree.norm(grads))
    updates = {}
    for clip in (0.0, 1.0):
        config.optimizer.clip_norm = clip
        tx, _ = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
        state = tx.init(params)
        updates[clip], _ = tx.update(grads, state, params)
        updates[clip] = jax.tree.map(np.asarray, updates[clip])
        assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    o = config.optimizer
    schedule = learning_rate_schedule(o, config.batch_size, config.total_steps)
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
    for clip, scale in ((0.0, 1.0), (1.0, 1.0 / norm)):
        scaled = jax.tree.map(lambda g, s=scale: g * s, grads)
        expected, _ = adamw.update(scaled, adamw.init(params), params)
        for name in params:
            np.testing.assert_allclose(updates[clip][name], expected[name], rtol=1e-6)


def test_gradient_accumulation_matches_full_batch():
    config = make_tiny_config(**{"model.drop_path_rate": 0.0})
    full, params_full, _ = _run(config, jax.devices()[:1], steps=2)
    config.optimizer.grad_accum_steps = 4
    accum, params_accum, _ = _run(config, jax.devices()[:1], steps=2)
    for a, f in zip(accum, full, strict=True):
        np.testing.assert_allclose(a["loss"], f["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], f["grad_norm"], rtol=1e-4)
    _assert_close(params_accum, params_full, rtol=1e-4)


def test_weight_decay_mask():
    config = make_tiny_config()
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    tx, _ = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    _, state, _ = init_state(config, tx, mesh)
    flat = {
        jax.tree_util.keystr(path, simple=True, separator="/"): decays
        for path, decays in jax.tree_util.tree_leaves_with_path(decay_mask(state.params))
    }
    assert flat["encoder/blocks/0/mlp/fc1/kernel"] and flat["encoder/patch_embed/proj/kernel"]
    assert flat["head/proj/kernel"]
    no_decay = [
        "encoder/cls_token", "encoder/mask_token", "encoder/blocks/0/norm1/scale",
        "encoder/blocks/0/attn/q_bias", "encoder/blocks/0/gamma_1", "encoder/blocks/0/mlp/fc1/bias",
        "encoder/rel_pos_bias/relative_position_bias_table",
    ]  # fmt: skip
    assert not any(flat[name] for name in no_decay)


def test_learning_rate_is_scaled_and_warmed_up():
    config = make_tiny_config()
    _, schedule = create_optimizer(config.optimizer, 1024, 100)
    peak = config.optimizer.base_lr * 2
    assert schedule(0) == 0
    np.testing.assert_allclose(schedule(config.optimizer.warmup_steps), peak, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), peak * config.optimizer.min_lr_ratio, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"model.variant": "vit"},
        {"model.rel_pos": "per_block", "model.drop_path_rate": 0.2},
        {"model.head": "transformer", "model.decoder.width": 32, "model.decoder.num_heads": 2},
        {"model.dtype": "bfloat16", "model.in_chans": 3},
        {"spatial.rule": "mask_token"},
        {"frequency.kind": "low_high_pass", "objective.frequency_fft_weight": 1.0},
        {"objective.combine": "alternate", "objective.norm_pix": True},
        {"objective.combine": "split", "objective.pixel_loss": "l2"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_step_variants_train(overrides):
    """Each variant's first loss is the objective's on the initial weights (views, masks and
    dropout from the step's key), its branches get the views its combine mode says, and a step
    moves the weights."""
    config = make_tiny_config(**overrides)
    history, params, _ = _run(config, jax.devices()[:2], steps=2)
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    tx, _ = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    graphdef, initial, _ = init_state(config, tx, mesh)
    initial = jax.device_get(initial.params)
    loss, sums, grad_norm = _reference_loss(config, graphdef, initial, _first_images(config), 0)
    bf16 = config.model.dtype == "bfloat16"  # rounded differently in the compiled step
    # drop path hardly moves the initial loss; its gradient shows which examples it dropped
    for name, value in {"loss": loss, "grad_norm": grad_norm, **sums}.items():
        rtol = 1e-5 if not bf16 else 2e-3 if name == "grad_norm" else 1e-4
        np.testing.assert_allclose(history[0][name], value, rtol=rtol, atol=1e-6, err_msg=name)
    n = config.batch_size
    counts = {"both": [(n, n)] * 2, "split": [(n // 2, n // 2)] * 2, "alternate": [(n, 0), (0, n)]}
    for m, expected in zip(history, counts[config.objective.combine], strict=True):
        assert tuple(int(m[f"count_{name}"]) for name in BRANCHES) == expected
        assert all(m[f"loss_{name}"] == 0 for name in BRANCHES if not m[f"count_{name}"])
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in history)
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), params, initial)
    assert moved["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    # the mask token learns exactly when the encoder sees it
    assert moved["encoder"]["mask_token"] == (config.spatial.rule == "mask_token")
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))


def test_ffts_and_views_stay_on_each_devices_share_of_the_batch():
    """XLA would gather the whole batch for an FFT, and a concatenation of views shuffles them."""
    config = make_tiny_config(**{"objective.frequency_fft_weight": 1.0})
    config.mesh.update(data=4, fsdp=2)
    mesh = parallel.create_mesh(config.mesh)
    _, _, state, step_fn, _ = create_training(config, mesh)
    batch = global_batch({"image": np.zeros((16, 32, 48, 1), np.uint8)}, mesh)
    hlo = step_fn.lower(state, batch).compile().as_text().splitlines()
    ffts = [line for line in hlo if " fft(" in line]
    # band-stop filter: 16 images / 8 devices; spectral loss: 32 views / 8 devices
    assert {line.split("c64[")[1].split(",")[0] for line in ffts} == {"2", "4"}
    assert not [line for line in hlo if "all-gather" in line and "c64" in line]
    assert not [line for line in hlo if "all-to-all" in line]


def test_non_finite_steps_are_skipped_and_counted():
    """A NaN batch leaves the weights and their EMA as they were, bit for bit, and counts a bad
    step; the lr schedule and the EMA's warm-up count applied updates only."""
    config = make_tiny_config(ema_decay=0.5)
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    _, _, state, step_fn, _ = create_training(config, mesh)
    before = jax.tree.map(np.array, state.params)
    poisoned = np.full((16, 32, 48, 1), np.nan, np.float32)  # a batch forced to contain NaN
    for bad in (1, 2):
        state, metrics = step_fn(state, global_batch({"image": poisoned}, mesh))
        assert int(metrics["skipped"]) == 1 and int(state.bad_steps) == bad
    assert int(state.step) == 2
    _assert_close(jax.device_get(state.params), before, rtol=0)  # parameters unchanged
    _assert_close(jax.device_get(state.ema_params), before, rtol=0)  # the EMA starts there
    clean = np.zeros((16, 32, 48, 1), np.uint8)
    _, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    ema = jax.tree.map(lambda p: p.astype(np.float64), before)
    for applied in range(2):  # the schedule counts applied updates, and lr logs what was used
        state, metrics = step_fn(state, global_batch({"image": clean}, mesh))
        assert int(metrics["skipped"]) == 0 and int(state.bad_steps) == 0
        assert float(metrics["lr"]) == float(schedule(applied)) != float(schedule(applied + 2))
        d = min(0.5, (1 + applied) / (10 + applied))  # not (3 + applied) / (12 + applied)
        ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * np.asarray(p), ema, state.params)
    _assert_close(jax.device_get(state.ema_params), ema, rtol=1e-5)
    fc1 = lambda tree: np.asarray(tree["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"])
    assert not np.array_equal(fc1(state.params), fc1(before))
    kept = jax.tree.map(np.array, state.ema_params)
    assert not np.array_equal(fc1(kept), fc1(state.params))  # the EMA is weights of its own
    state, metrics = step_fn(state, global_batch({"image": poisoned}, mesh))
    assert int(metrics["skipped"]) == 1
    for got, want in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(got, want)  # kept as it was: finite, not mixed with NaN


def test_step_key_is_the_seed_key_folded_with_the_step():
    """The run's key is key(config.seed); step s draws from fold_in(that key, s)."""
    config = make_tiny_config(seed=7)
    tx, _ = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    state = state_initializer(config, tx)()
    keys = set()
    for step in (0, 1, 5):
        got = jax.random.key_data(state.replace(step=jnp.int32(step)).step_key())
        want = jax.random.fold_in(jax.random.key(config.seed), step)
        np.testing.assert_array_equal(got, jax.random.key_data(want))
        keys.add(tuple(np.asarray(got).tolist()))
    assert len(keys) == 3


def test_each_step_draws_new_masks_from_its_key():
    """Two steps on one batch with the same weights (the first update's lr is 0) corrupt it
    differently: each loss is the reference loss under fold_in(key(seed), step)."""
    config = make_tiny_config()
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    _, graphdef, state, step_fn, _ = create_training(config, mesh)
    params = jax.tree.map(np.array, state.params)
    images = _first_images(config)
    losses = []
    for step in (0, 1):
        _assert_close(jax.device_get(state.params), params, rtol=0)  # lr 0: weights unchanged
        state, metrics = step_fn(state, global_batch({"image": images}, mesh))
        loss, *_ = _reference_loss(config, graphdef, params, images, step)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
        losses.append(float(metrics["loss"]))
    assert losses[0] != losses[1]


def _vit_large_config(**overrides):
    """The ViT-L/16 recipe (width 1024, 16 heads) at test scale: 32x32 images, batch 8."""
    config = usfm_vitl16.get_config()
    config.update(image_size=(32, 32), batch_size=8)
    config.model.update(dtype="float32", drop_path_rate=0.0, in_chans=1, **overrides)
    config.spatial.mask_patch_size = 16
    config.frequency.update(center_protect=1, base_bw=2, max_increase=4)
    config.data.num_images = 16
    return config


def test_vit_large_with_fsdp_8_holds_an_eighth_of_the_state_per_device():
    config = _vit_large_config()  # all 24 blocks: shapes only, nothing allocated
    mesh = parallel.create_mesh(config.mesh)
    assert dict(mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 8}
    tx, _ = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    state = jax.eval_shape(state_initializer(config, tx))
    shardings = parallel.state_shardings(state, mesh, config.mesh.fsdp_min_size)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    assert 300e6 < total / 4 < 310e6  # ViT-L/16: ~304M float32 parameters
    leaves = jax.tree.leaves(state.params)
    per_device = sum(
        np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(leaves, jax.tree.leaves(shardings.params), strict=True)
    )
    assert 1 / 8 <= per_device / total < 1.01 / 8, per_device / total


def test_fsdp_step_equals_the_data_parallel_step():
    """ViT-L blocks (2 of them, to fit in CI memory): one step sharded over fsdp=8 gives the loss
    and parameters of the same step over data=8, with each device holding ~1/8 of the params."""
    config = _vit_large_config(depth=2)
    fsdp, params_fsdp, state = _run(config, jax.devices(), steps=1)
    qkv = state.params["encoder"]["blocks"][0]["attn"]["qkv"]["kernel"]  # [1024, 3072]
    assert qkv.sharding.spec == P(None, "fsdp") and qkv.addressable_shards[0].data.shape == (
        1024,
        384,
    )
    on_device_0 = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.params))
    total = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert 1 / 8 <= on_device_0 / total < 1.05 / 8
    mesh = state.params["encoder"]["norm"]["scale"].sharding.mesh
    batch = global_batch(next(iter(create_pretrain_dataset(config))), mesh)
    step_fn = create_training(config, mesh).train_step
    hlo = step_fn.lower(state, batch).as_text()
    # activations stay split over the batch: one constraint per block (and its backward)
    assert hlo.count("sharding_constraint") >= config.model.depth
    config.mesh.update(data=8, fsdp=1)
    data_parallel, params_dp, _ = _run(config, jax.devices(), steps=1)
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(fsdp[0][name], data_parallel[0][name], rtol=1e-5)
    _assert_close(params_fsdp, params_dp, rtol=1e-5)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_recomputes_blocks_without_changing_the_numbers(remat):
    config = make_tiny_config(**{"model.drop_path_rate": 0.1})
    plain, params_plain, _ = _run(config, jax.devices()[:1], steps=2)
    config.model.remat = remat
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    _, _, state, step_fn, _ = create_training(config, mesh)
    batch = global_batch(next(iter(create_pretrain_dataset(config))), mesh)
    jaxpr = str(step_fn.trace(state, batch).jaxpr)
    assert jaxpr.count("remat2[") >= config.model.depth  # jax.checkpoint around every block
    recomputed, params_remat, _ = _run(config, jax.devices()[:1], steps=2)
    for a, b in zip(recomputed, plain, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    _assert_close(params_remat, params_plain, rtol=1e-5)


def test_scanned_blocks_give_the_same_numbers_and_compile_one_block():
    config = make_tiny_config(**{"model.drop_path_rate": 0.2, "model.depth": 3})
    plain, params_plain, _ = _run(config, jax.devices()[:1], steps=2)
    config.model.update(scan_layers=True, remat="dots")
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
    _, _, state, step_fn, _ = create_training(config, mesh)
    batch = global_batch(next(iter(create_pretrain_dataset(config))), mesh)
    assert "length=3" in str(step_fn.trace(state, batch).jaxpr)  # one scan over 3 blocks
    scanned, params_scanned, _ = _run(config, jax.devices()[:1], steps=2)
    for a, b in zip(scanned, plain, strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    _assert_close(params_scanned, params_plain, rtol=1e-5)  # same names, same values


@pytest.mark.parametrize(
    "size, params", [("large", 303.3e6), ("huge", 631.3e6), ("giant", 1.011e9)]
)
def test_large_configs_have_their_published_sizes_and_validate(size, params):
    """ViT-L/16, ViT-H/16 and ViT-g/14 encoders (shapes only): parameter counts within 1% of
    timm's (BEiT variant: relative position tables instead of a position embedding)."""
    config = usfm_vitl16.get_config(f"size={size}")
    validate(config, num_devices=64)
    model = nnx.eval_shape(
        lambda: create_encoder(config.model, tuple(config.image_size), nnx.Rngs(0))
    )
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(count / params - 1) < 0.01, count
