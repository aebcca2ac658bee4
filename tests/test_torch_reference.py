"""The PyTorch reference of the benchmark (benchmarks/torch_reference.py) computes the same step
as usfm_jax: same views for the same masks and noise, same loss, gradients and update on the
same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_tiny_config
from flax import nnx

from benchmarks import torch_reference as ref
from usfm_jax.masking.frequency import apply_frequency_mask
from usfm_jax.objectives.dual import create_objective
from usfm_jax.optim import create_optimizer
from usfm_jax.train_step import abstract_model, apply_gradients, fresh_state, state_initializer


def _config(**overrides):
    defaults = {"model.drop_path_rate": 0.0, "model.dtype": "float32"}
    return make_tiny_config(**{**defaults, **overrides})


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def setup():
    config = _config()
    tx, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    state = jax.jit(state_initializer(config, tx))()
    images = jax.random.uniform(jax.random.key(1), (4, *config.image_size, 1))
    return config, tx, schedule, state, images


def test_views_match_jax_for_the_same_masks_and_noise(setup):
    config, _, _, _, images = setup
    step = ref.DualStep(config, compile_mode=None)
    spatial, frequency = step.spatial, step.frequency
    k_mask, k_noise, k_rings = jax.random.split(jax.random.key(2), 3)
    mask = spatial.sample(k_mask, images.shape[0])  # [B, gh, gw]
    noise = jax.random.normal(k_noise, images.shape)
    expected = spatial.corrupt(images, mask, k_noise)
    got = step.spatial_inputs(_nchw(images), torch.from_numpy(np.array(mask)), _nchw(noise))
    np.testing.assert_allclose(got.numpy(), _nchw(expected).numpy(), atol=1e-6)
    np.testing.assert_array_equal(
        step.token_weight(torch.from_numpy(np.array(mask))).numpy(),
        np.array(spatial.token_mask(mask), np.float32),
    )
    removed = frequency.sample(k_rings, images.shape[0])  # [B, H, W]
    expected = apply_frequency_mask(images, removed, frequency.output)
    got = ref.band_stop(_nchw(images), torch.from_numpy(np.array(removed)), frequency.output)
    np.testing.assert_allclose(got.numpy(), _nchw(expected).numpy(), atol=1e-5)
    assert float(jnp.abs(expected - images).max()) > 1e-2  # the filter did remove something


def test_sampled_views_follow_the_jax_distributions(setup):
    config, _, _, _, images = setup
    torch.manual_seed(0)
    step = ref.DualStep(config, compile_mode=None)
    b = 64
    removed = step.sample_removed(b).numpy()  # [B, H, W]
    ids = step.frequency.ring_ids
    for row in removed:
        rings = set(np.unique(ids[row]).tolist())
        assert len(rings) == step.frequency.num_drop and -1 not in rings
        np.testing.assert_array_equal(row, np.isin(ids, list(rings)))  # whole rings only
    counts = np.bincount(ids[removed.any(0)].ravel() + 1)
    assert (counts[1:] > 0).all()  # every ring gets drawn
    views = step.views(_nchw(images))
    v = images.shape[0]
    assert views.inputs.shape == (2 * v, 1, *config.image_size)
    np.testing.assert_array_equal(views.branch.numpy(), [0, 1] * v)
    s = (config.spatial.mask_patch_size // config.model.patch_size) ** 2
    weight = views.patch_weight.numpy()
    np.testing.assert_array_equal(weight[0::2].sum(1), step.spatial.num_masked * s)
    np.testing.assert_array_equal(weight[1::2], 1.0)
    # outside the mask-patches the spatial view is the clean image
    clean = step.normalize(_nchw(images))
    outside = ref.patchify(torch.ones_like(views.inputs[0::2]), config.model.patch_size)
    outside = outside * (1 - views.patch_weight[0::2, :, None])
    diff = ref.patchify(views.inputs[0::2] - clean, config.model.patch_size) * outside
    assert float(diff.abs().max()) < 1e-6
    assert float((views.inputs[0::2] - clean).abs().max()) > 0.5  # and noisy inside


def _jax_loss_and_grads(config, state, images):
    objective = create_objective(config)
    views = objective.views(images, jax.random.key(3), jnp.int32(0))
    counts = objective.branch_counts(views)
    graphdef = nnx.graphdef(abstract_model(config))

    def loss_fn(params):
        pred = nnx.merge(graphdef, params)(views.inputs, views.token_mask)
        return objective.loss(pred, views, counts)[0]

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    torch_views = ref.TorchViews(
        inputs=_nchw(views.inputs),
        target=_nchw(views.target),
        patch_weight=torch.from_numpy(np.array(views.patch_weight)),
        branch=torch.from_numpy(np.array(views.branch, np.int64)),
    )
    return loss, grads, torch_views


def _torch_tree(tree, config) -> dict[str, np.ndarray]:
    """A usfm_jax parameter-shaped tree as the reference's named parameters."""
    state = ref.from_jax_params(tree, config)
    named = dict(state["encoder_state"])
    named.pop("mask_token", None)
    named.update({f"head.{k}": v for k, v in state["head_state"].items()})
    return named


def _torch_named(step: ref.DualStep, attr: str = "data") -> dict[str, np.ndarray]:
    named = dict(step.encoder.named_parameters())
    named.update({f"head.{k}": v for k, v in step.head.named_parameters()})
    return {k: getattr(p, attr).detach().numpy() for k, p in named.items()}


def test_loss_and_gradients_match_jax_on_the_same_weights(setup):
    config, _, _, state, images = setup
    loss, grads, views = _jax_loss_and_grads(config, state, images)
    step = ref.DualStep(config, compile_mode=None, **ref.from_jax_params(state.params, config))
    step.encoder.eval()  # no drop path (also off in the config): deterministic
    torch_loss = step.loss(step.predict(views.inputs), views)
    torch_loss.backward()
    np.testing.assert_allclose(float(torch_loss.detach()), float(loss), rtol=1e-5)
    expected = _torch_tree(grads, config)
    got = _torch_named(step, "grad")
    assert sorted(got) == sorted(expected)
    for name, g in got.items():
        scale = np.abs(expected[name]).max()
        assert scale > 0, name
        np.testing.assert_allclose(g, expected[name], atol=1e-4 * scale, err_msg=name)


def test_one_update_matches_optax(setup):
    config, _, _, state, images = setup
    config = _config(**{"optimizer.warmup_steps": 0, "optimizer.clip_norm": 1e-3})
    tx, schedule = create_optimizer(config.optimizer, config.batch_size, config.total_steps)
    state = fresh_state(state.params, tx, config.seed)
    loss, grads, views = _jax_loss_and_grads(config, state, images)
    new_state, metrics = apply_gradients(state, grads, loss, tx, schedule)
    assert float(metrics["grad_norm"]) > 1e-3  # clipping is active
    step = ref.DualStep(config, compile_mode=None, **ref.from_jax_params(state.params, config))
    step.encoder.eval()
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(float(schedule(0)))
    step.update(step.loss(step.predict(views.inputs), views))
    before = _torch_tree(state.params, config)
    expected = _torch_tree(new_state.params, config)
    got = _torch_named(step)
    lr = float(schedule(0))
    moved = 0
    for name, p in got.items():
        np.testing.assert_allclose(p, expected[name], atol=0.02 * lr, err_msg=name)
        moved += int((np.abs(p - before[name]) > 0.5 * lr).sum())
    assert moved > 0.5 * sum(p.size for p in got.values())  # most weights moved by ~lr


def test_unsupported_settings_are_named():
    config = _config(**{"spatial.rule": "mask_token", "objective.combine": "split"})
    with pytest.raises(ValueError, match=r"spatial.rule='mask_token'.*objective.combine='split'"):
        ref.DualStep(config, compile_mode=None)
    assert ref.unsupported(_config()) == []
