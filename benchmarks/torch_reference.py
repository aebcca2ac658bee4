"""A PyTorch reference of USFM's pre-training step, to measure usfm_jax against.

The same step as ``usfm_jax.train_step`` for the pixel objectives (spatial noise addition,
frequency band-stop, or both): views built on the device from the clean batch (exact-count
mask-patches with Gaussian noise; distinct random rings zeroed in the 2-D FFT), the encoder as
timm's ``Beit`` (or ``VisionTransformer``) built from the card our converter writes, a linear
pixel head, the same per-view L1 loss and branch weighting, global-norm clipping and AdamW with
weight decay on matrices only. bf16 autocast when the config computes in bf16; ``torch.compile``
on the forward pass and loss.

The static geometry (mask-patch grid, ring map) is taken from usfm_jax's own maskers, so both
frameworks draw from identical distributions; ``tests/test_torch_reference.py`` checks the
views, loss and gradients against the JAX step on the same weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F

from usfm_jax.convert.cards import build_timm_model, timm_spec
from usfm_jax.convert.formats import Architecture, to_torch
from usfm_jax.masking.frequency import BandStop
from usfm_jax.models.factory import encoder_dims
from usfm_jax.objectives.dual import FREQUENCY, SPATIAL, create_frequency, create_spatial
from usfm_jax.optim import NO_DECAY_NAMES, peak_learning_rate


class TorchViews(NamedTuple):
    """The model inputs of one step (torch layout), as ``usfm_jax.objectives.dual.Views``."""

    inputs: torch.Tensor  # [V, C, H, W] corrupted, normalised
    target: torch.Tensor  # [V, C, H, W] clean, normalised
    patch_weight: torch.Tensor  # [V, N]
    branch: torch.Tensor  # [V] int64


def unsupported(config: ml_collections.ConfigDict) -> list[str]:
    """The settings of ``config`` this reference does not implement (empty: it runs)."""
    c, problems = config, []
    checks = [
        (c.model.head == "linear", f"model.head={c.model.head!r} (only 'linear')"),
        (
            not c.spatial.enabled or c.spatial.rule == "gaussian",
            f"spatial.rule={c.spatial.rule!r} (only 'gaussian')",
        ),
        (
            not c.frequency.enabled or c.frequency.kind == "band_stop",
            f"frequency.kind={c.frequency.kind!r} (only 'band_stop')",
        ),
        (c.objective.combine == "both", f"objective.combine={c.objective.combine!r} (only 'both')"),
        (not c.objective.norm_pix, "objective.norm_pix=True"),
        (not c.objective.frequency_fft_weight, "objective.frequency_fft_weight > 0"),
        (not c.get("representation", {}).get("enabled"), "representation.enabled=True"),
        (c.optimizer.grad_accum_steps == 1, "optimizer.grad_accum_steps > 1"),
        (not c.ema_decay, "ema_decay > 0"),
    ]
    problems = [text for ok, text in checks if not ok]
    if not (c.spatial.enabled or c.frequency.enabled):
        problems.append("no pixel branch enabled")
    return problems


def torch_architecture(config: ml_collections.ConfigDict) -> tuple[Architecture, str]:
    """The encoder's architecture and the converter format whose timm model matches it."""
    width, depth, heads = encoder_dims(config.model)
    model = {**config.model.to_dict(), "width": width, "depth": depth, "num_heads": heads}
    arch = Architecture.from_config(model, config.image_size)
    if arch.variant == "vit":
        return arch, "timm-vit"
    return arch, "usfm" if arch.rel_pos == "shared" else "timm-beit"


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch * patch * C] in usfm_jax's order (row-major grid,
    then row, column, channel within the patch)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), -1)


def exact_count_mask(batch: int, n: int, count: int, device: torch.device) -> torch.Tensor:
    """bool [B, n], exactly ``count`` True per row, a uniformly random subset."""
    ranks = torch.rand(batch, n, device=device).argsort(-1).argsort(-1)
    return ranks < count


def band_stop(images: torch.Tensor, removed: torch.Tensor, output: str) -> torch.Tensor:
    """Zero the ``removed`` [B, H, W] frequencies of every channel of ``images`` [B, C, H, W]
    (unshifted layout) and return the magnitude (or real part) of the inverse FFT."""
    spec = torch.fft.fft2(images.float())  # [B, C, H, W] complex64
    spec = spec.masked_fill(removed[:, None], 0)
    out = torch.fft.ifft2(spec)
    return out.abs() if output == "abs" else out.real


class DualStep:
    """Model, optimizer and step of the PyTorch reference, for a run config."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        device: str | torch.device = "cpu",
        *,
        compile_mode: str | None = "default",
        encoder_state: dict[str, np.ndarray] | None = None,
        head_state: dict[str, np.ndarray] | None = None,
    ):
        problems = unsupported(config)
        if problems:
            raise ValueError("the PyTorch reference does not implement: " + "; ".join(problems))
        self.device = torch.device(device)
        self.patch = config.model.patch_size
        self.spatial = create_spatial(config)
        self.frequency = create_frequency(config)
        if self.frequency is not None:  # ring id per frequency bin, num_rings = never removed
            ids = self.frequency.ring_ids
            ring_gather = np.where(ids < 0, self.frequency.num_rings, ids)
            self.ring_gather = torch.as_tensor(ring_gather, device=self.device)
        self.config = config
        self.autocast = config.model.dtype == "bfloat16"
        arch, fmt = torch_architecture(config)
        width = arch.width
        self.in_chans = arch.in_chans
        spec = timm_spec(arch, fmt)
        spec["kwargs"].update(drop_path_rate=config.model.drop_path_rate)
        if arch.variant == "beit":
            spec["kwargs"].update(init_values=config.model.layer_scale_init)
        self.encoder = build_timm_model({"timm": spec})
        out = self.patch * self.patch * config.model.out_chans
        self.head = torch.nn.Linear(width, out)
        if encoder_state is not None:
            state = {k: torch.from_numpy(np.array(v)) for k, v in encoder_state.items()}
            state.pop("mask_token", None)  # SimMIM's; the gaussian rule never uses it
            self.encoder.load_state_dict(state, strict=True)
        if head_state is not None:
            self.head.load_state_dict(
                {k: torch.from_numpy(np.array(v)) for k, v in head_state.items()}
            )
        self.encoder.to(self.device).train()
        self.head.to(self.device).train()
        self.optimizer = self._optimizer()
        self.forward_loss = self._forward_loss
        if compile_mode:  # the views, forward pass and loss as one compiled graph
            self.forward_loss = torch.compile(self._forward_loss, mode=compile_mode)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.encoder.parameters(), *self.head.parameters()]

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW decaying matrices only (as ``usfm_jax.optim.decay_mask``), at the peak lr."""
        named = [*self.encoder.named_parameters(), *self.head.named_parameters(prefix="head")]
        decays = lambda n, p: p.ndim >= 2 and not set(n.split(".")) & NO_DECAY_NAMES
        decay = [p for n, p in named if decays(n, p)]
        other = [p for n, p in named if not decays(n, p)]
        o = self.config.optimizer
        cuda = self.device.type == "cuda"
        return torch.optim.AdamW(
            [{"params": decay}, {"params": other, "weight_decay": 0.0}],
            lr=peak_learning_rate(o, self.config.batch_size),
            betas=(o.b1, o.b2),
            weight_decay=o.weight_decay,
            fused=cuda,
            foreach=None if cuda else True,
        )

    # ----------------------------------------------------------------------------------------
    # Views
    # ----------------------------------------------------------------------------------------

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        n = self.config.normalization
        return (images - n.mean) / n.std

    def spatial_inputs(
        self, images: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """images [B, C, H, W] in [0, 1] + ``sigma * noise`` inside the mask-patches ``mask``
        [B, gh, gw]."""
        s = self.spatial.mask_patch_size
        pixels = mask.repeat_interleave(s, 1).repeat_interleave(s, 2)[:, None]  # [B, 1, H, W]
        return torch.where(pixels, images + self.spatial.sigma * noise, images)

    def token_weight(self, mask: torch.Tensor) -> torch.Tensor:
        """Mask-patch mask [B, gh, gw] -> loss weight per model patch [B, N]."""
        if self.config.objective.spatial_loss_on == "all":
            return torch.ones(mask.shape[0], self.num_patches, device=mask.device)
        s = self.spatial.mask_patch_size // self.patch
        up = mask.repeat_interleave(s, 1).repeat_interleave(s, 2)
        return up.reshape(mask.shape[0], -1).float()

    @property
    def num_patches(self) -> int:
        h, w = self.config.image_size
        return (h // self.patch) * (w // self.patch)

    def sample_removed(self, batch: int) -> torch.Tensor:
        """bool [B, H, W]: ``num_drop`` distinct random rings per image (unshifted layout)."""
        bs: BandStop = self.frequency
        drop = exact_count_mask(batch, bs.num_rings, bs.num_drop, self.device)  # [B, K]
        drop = F.pad(drop, (0, 1), value=False)  # [B, K + 1]: column K = never removed
        return drop[:, self.ring_gather]  # [B, H, W]

    def views(self, images: torch.Tensor) -> TorchViews:
        """Clean images [B, C, H, W] in [0, 1] -> both branches' views, interleaved along the
        batch (image i's spatial view at 2i, its frequency view at 2i + 1)."""
        b = images.shape[0]
        parts = []
        if self.spatial is not None:
            gh, gw = self.spatial.grid
            mask = exact_count_mask(b, gh * gw, self.spatial.num_masked, self.device)
            mask = mask.reshape(b, gh, gw)
            noisy = self.spatial_inputs(images, mask, torch.randn_like(images))
            parts.append((noisy, self.token_weight(mask), SPATIAL))
        if self.frequency is not None:
            filtered = band_stop(images, self.sample_removed(b), self.frequency.output)
            ones = torch.ones(b, self.num_patches, device=images.device)
            parts.append((filtered, ones, FREQUENCY))
        target = self.normalize(images)

        def interleave(xs: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(xs, 1).reshape(-1, *xs[0].shape[1:])

        return TorchViews(
            inputs=interleave([self.normalize(x) for x, _, _ in parts]),
            target=interleave([target] * len(parts)),
            patch_weight=interleave([w for _, w, _ in parts]),
            branch=torch.tensor([k for _, _, k in parts], device=images.device).repeat(b),
        )

    # ----------------------------------------------------------------------------------------
    # Loss and step
    # ----------------------------------------------------------------------------------------

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised inputs [V, C, H, W] -> predicted pixels of every patch [V, N, P]."""
        if inputs.shape[1] == 1 and self.in_chans == 3:
            inputs = inputs.expand(-1, 3, -1, -1)  # gray replicated to RGB, as usfm_jax does
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            tokens = self.encoder.forward_features(inputs)  # [V, 1 + N, D]
            return self.head(tokens[:, 1:]).float()

    def loss(self, pred: torch.Tensor, views: TorchViews) -> torch.Tensor:
        """Per-view weighted L1 / L2 over patches; branch means, weighted and summed."""
        o = self.config.objective
        diff = pred - patchify(views.target, self.patch)
        per_patch = (diff.abs() if o.pixel_loss == "l1" else diff.square()).mean(-1)  # [V, N]
        w = views.patch_weight
        per_view = (per_patch * w).sum(-1) / w.sum(-1).clamp_min(1.0)  # [V]
        per_view = torch.where(
            views.branch == FREQUENCY, o.frequency_pixel_weight * per_view, per_view
        )
        total = pred.new_zeros(())
        for branch, weight in ((SPATIAL, o.spatial_weight), (FREQUENCY, o.frequency_weight)):
            chosen = views.branch == branch
            branch_sum = torch.where(chosen, per_view, 0).sum()
            total = total + weight * branch_sum / chosen.sum().clamp_min(1)
        return total

    def _forward_loss(self, images: torch.Tensor) -> torch.Tensor:
        views = self.views(images)
        return self.loss(self.predict(views.inputs), views)

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        """One training step on uint8 images [B, H, W, C]; returns the loss (not synchronised)."""
        images = batch.to(self.device).permute(0, 3, 1, 2).float() / 255.0  # [B, C, H, W]
        return self.update(self.forward_loss(images))

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward pass, global-norm clipping and the AdamW update for ``loss``."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optimizer.clip_norm
        if clip:
            torch.nn.utils.clip_grad_norm_(self.parameters(), clip, foreach=True)
        self.optimizer.step()
        return loss.detach()


def from_jax_params(params: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """usfm_jax pre-training parameters -> ``DualStep`` keyword arguments (encoder and head
    state dicts), so that both frameworks start from the same weights."""
    arch, fmt = torch_architecture(config)
    encoder, _ = to_torch(params["encoder"], arch, fmt)
    kernel = np.asarray(params["head"]["proj"]["kernel"])  # [D, P]
    head = {"weight": kernel.T.copy(), "bias": np.asarray(params["head"]["proj"]["bias"])}
    return {"encoder_state": encoder, "head_state": head}


def model_dtype_name(config: ml_collections.ConfigDict) -> str:
    """What the reference computes in: bf16 autocast or float32."""
    return "bf16 autocast" if config.model.dtype == "bfloat16" else "float32"
