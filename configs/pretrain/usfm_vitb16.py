"""USFM spatial-frequency dual masked image modeling: ViT-B/16 at 224, global batch 2048.

The paper publishes the objective, not the recipe. Where it is silent, the values below are our
choice (marked "ours"), mostly taken from SimMIM, the authors' lineage:
- spatial branch: 32 px mask-patches, ratio 0.6, L1 on masked pixels (SimMIM); corruption by
  additive Gaussian noise of std 0.5 on [0, 1] intensities (ours: the paper's "noise addition").
- frequency branch: band-stop with center_protect 5, base_bw 10, increase_factor 0.5,
  max_increase 20 (the worked example of the official generator's description; ours), half of
  the rings removed (ours), magnitude of the inverse FFT (official code); L1 over the whole
  image (ours).
- both branches every step, equal weights (ours).
- optimizer: AdamW (0.9, 0.999), weight decay 0.05, clip 5.0, base lr 1e-4 per 512 images,
  drop path 0.1 (SimMIM ViT-B); 100k steps with 10k warmup (ours: about 100 epochs of 2M images).
- normalisation of the gray input: (x - 0.5) / 0.25 (ours); 3 input channels with the gray image
  replicated, the layout of the released USFM weights.

Argument (``--config=configs/pretrain/usfm_vitb16.py:ARG``): ``size=base`` picks the encoder size.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, size="base")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.image_size = (224, 224)
    c.batch_size = 2048
    c.total_steps = 100_000

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # the embedded phantom generator, or "tfds" (ingested data)
    c.data.num_images = 100_000  # synthetic only
    c.data.tfds_dir = ""  # tfds: DATA_DIR/NAME/1.0.0 written by usfm_jax.data.ingest
    c.data.split = "train"
    c.data.weighting = "balanced"  # organ-balanced (USFM) | proportional | temperature | explicit
    # weighting=temperature: p ~ count ** t (unset: 0.5); any other weighting refuses it
    c.data.temperature = ml_collections.config_dict.placeholder(float)
    c.data.organ_weights = ""  # weighting=explicit: "liver=2,kidney=1,..."
    c.data.augment = ml_collections.ConfigDict(  # tfds only (ours: mild, speckle-preserving)
        dict(crop_scale=(0.4, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=0.5, gamma=(0.8, 1.25),
             contrast=(0.8, 1.2), brightness=0.0)
    )  # fmt: skip
    c.data.num_threads = 16
    c.data.prefetch = 2  # batches read ahead: at least num_threads (a batch per thread)
    c.data.worker_count = 0  # > 0: decode and augment in that many worker processes

    c.normalization = ml_collections.ConfigDict(dict(mean=0.5, std=0.25))

    c.model = ml_collections.ConfigDict()
    c.model.variant = "beit"  # "beit" (USFM) or "vit" (timm / URFM)
    c.model.size = args.size
    c.model.width = ml_collections.config_dict.placeholder(int)  # override of the size's width
    c.model.depth = ml_collections.config_dict.placeholder(int)
    c.model.num_heads = ml_collections.config_dict.placeholder(int)
    c.model.patch_size = 16
    c.model.in_chans = 3
    c.model.out_chans = 1
    c.model.rel_pos = "shared"  # one table for all blocks, as released; or "per_block"
    c.model.layer_scale_init = 0.1
    c.model.drop_path_rate = 0.1
    c.model.dtype = "bfloat16"  # compute dtype; parameters are float32
    c.model.remat = "none"  # per-block rematerialisation: none | dots (keep matmuls) | full
    c.model.scan_layers = False  # one lax.scan over the blocks: faster compiles for deep models
    # "xla" | "cudnn" (fused, NVIDIA GPU + bf16) | "pallas" (fused Triton kernels, NVIDIA GPU;
    # ~1 ms a step behind cuDNN on an H100) | "auto": cudnn if it can
    c.model.attention = "auto"
    # "xla" | "pallas": the GELU fused into the MLP's matmuls (Triton kernels, NVIDIA GPU; ~1 ms a
    # step behind cuBLAS + XLA's GELU on an H100) | "pallas_backward": XLA's forward pass and
    # the Pallas kernel of the backward pass (NVIDIA GPU; not yet timed)
    c.model.mlp = "xla"
    # "xla" | "pallas": each LayerNorm of the encoder and the residual add before it as one
    # kernel per direction (Triton kernels, NVIDIA GPU) | "auto": pallas on an NVIDIA GPU with
    # bf16 / fp16 compute up to width 1024 (a 4% faster step on an H100), else xla
    c.model.norm = "auto"
    c.model.head = "linear"  # "linear" (SimMIM) or "transformer"
    c.model.decoder = ml_collections.ConfigDict(dict(width=256, depth=2, num_heads=8))

    c.spatial = ml_collections.ConfigDict()
    c.spatial.enabled = True
    c.spatial.mask_patch_size = 32
    c.spatial.ratio = 0.6
    c.spatial.rule = "gaussian"  # gaussian | speckle | replace | mean | mask_token
    c.spatial.sigma = 0.5

    c.frequency = ml_collections.ConfigDict()
    c.frequency.enabled = True
    c.frequency.kind = "band_stop"  # or "low_high_pass" (MFM)
    c.frequency.ratio = 0.5
    c.frequency.center_protect = 5
    c.frequency.base_bw = 10
    c.frequency.increase_factor = 0.5
    c.frequency.max_increase = 20
    c.frequency.output = "abs"  # "abs" (official) or "real"
    c.frequency.radius = 16.0  # low_high_pass only
    c.frequency.p_low = 0.5  # low_high_pass only
    c.frequency.clip = True  # low_high_pass only: clip to [0, 1] as MFM

    c.objective = ml_collections.ConfigDict()
    c.objective.combine = "both"  # both | split | alternate
    c.objective.spatial_weight = 1.0
    c.objective.frequency_weight = 1.0
    c.objective.pixel_loss = "l1"  # l1 | l2
    c.objective.spatial_loss_on = "masked"  # masked | all
    c.objective.norm_pix = False
    c.objective.frequency_pixel_weight = 1.0
    c.objective.frequency_fft_weight = 0.0  # > 0 adds MFM's spectral loss
    c.objective.fft_loss_on = "removed"  # removed | all

    # URFM's representation objective (off here; see urfm_vitb16.py): predict a frozen
    # teacher's patch features. It adds to the pixel branches' loss with this weight.
    c.representation = ml_collections.ConfigDict()
    c.representation.enabled = False
    c.representation.weight = 1.0
    c.representation.student = "mae"  # mae (visible patches + decoder) | simmim (mask tokens)
    c.representation.ratio = 0.75
    c.representation.mask_patch_size = 16  # the model patch: random; larger: block-wise
    c.representation.target_norm = "layernorm"  # layernorm (no affine) | l2 | none
    c.representation.loss = "smooth_l1"  # smooth_l1 | cosine | mse
    c.representation.beta = 2.0  # smooth_l1's beta
    c.representation.loss_on = "masked"  # masked | all
    c.representation.decoder = ml_collections.ConfigDict(dict(width=768, depth=8, num_heads=16))
    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = ""  # open_clip checkpoint (BiomedCLIP) or timm ViT state dict
    c.teacher.format = "auto"  # auto | open-clip-visual | timm-vit
    c.teacher.layer = "final_norm"  # last_block | final_norm | projection (CLIP's 512-d head)
    c.teacher.normalization = ""  # "": the card's or the format's (CLIP's for open_clip)
    c.teacher.num_heads = ml_collections.config_dict.placeholder(int)  # non-standard widths
    c.teacher.dtype = ""  # "": model.dtype
    c.teacher.targets = ""  # a cache of precomputed targets (python -m usfm_jax.teacher_cache)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.base_lr = 1e-4  # per 512 images
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.05
    c.optimizer.clip_norm = 5.0
    c.optimizer.warmup_steps = c.get_ref("total_steps") // 10  # follows --config.total_steps
    c.optimizer.min_lr_ratio = 0.01
    c.optimizer.grad_accum_steps = 1

    # Device mesh: dcn (TPU slices / nodes) x data x fsdp, -1 = all remaining devices; arrays
    # under fsdp_min_size elements stay replicated.
    c.mesh = ml_collections.ConfigDict(dict(dcn=1, data=-1, fsdp=1, fsdp_min_size=2**16))

    # Save every `every` steps (and at the first step and on pre-emption); keep the last `keep`
    # and, for the record, every multiple of `keep_every` (0: none; a multiple of `every`).
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3))
    c.checkpoint.keep_every = c.checkpoint.get_ref("every") * 10  # follows every
    c.max_bad_steps = 100  # stop after this many consecutive non-finite (skipped) steps
    # > 0: keep an exponential moving average of the parameters (checkpointed; exports and
    # conversions take it by default)
    c.ema_decay = 0.0

    # Representation quality while training: kNN and linear probes of organ classification on
    # a labelled held-out set (synthetic: another seed; ingested: a sample of `split`), every
    # `every` steps (0: off), logged as probe/* (usfm_jax.probe).
    c.probe = ml_collections.ConfigDict(
        dict(every=0, num_train=1024, num_test=512, k=20, temperature=0.07, linear_steps=300,
             split="val")
    )  # fmt: skip

    c.log_every = 100
    c.image_every = 2000
    c.num_preview_images = 4
    return c.lock()  # a misspelled field in a derived config is an error, not a new field
