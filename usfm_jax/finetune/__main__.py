"""Fine-tuning entry point.

    python -m usfm_jax.finetune --config configs/finetune/classify.py --workdir runs/cls \
        [--config.init=CHECKPOINT_OR_WEIGHTS] [--config.label_fraction=0.2] [--config.seed=1]

With ``--config.init``, the checkpoint brings the encoder's architecture, weights and input
normalisation: an architecture field (``--config.model.depth``...), ``model.layer_scale_init``
or ``--config.normalization.*`` that contradicts it is an error, not silently ignored.

Trains on the label-fraction subset, evaluates on val every ``eval_every`` steps keeping the
best parameters (``best/``), then writes the test metrics (``results.json``, ``results.md``)
and overlays (``test_predictions/``). See ``usfm_jax.finetune.run``.
"""

from __future__ import annotations

import sys

import jax
from absl import flags
from ml_collections import config_flags

from usfm_jax import distributed
from usfm_jax.checkpoint import CheckpointError
from usfm_jax.cli import exit_if_out_of_memory, run_program, start_jax
from usfm_jax.config_validation import ConfigError
from usfm_jax.convert import ConversionError
from usfm_jax.distributed import DistributedError
from usfm_jax.finetune.run import finetune
from usfm_jax.paths import PathError
from usfm_jax.reporting import TrainingDiverged, quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file (python).")
_WORKDIR = flags.DEFINE_string("workdir", None, "New directory for the run's outputs.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES, "Multi-process runs, as for usfm_jax.train."
)


def main(argv: list[str]) -> None:
    del argv  # parse_flags refuses positional arguments
    quiet_library_logs()
    try:
        start_jax(_DISTRIBUTED.value)
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
        finetune(_CONFIG.value, _WORKDIR.value, overrides)
    except (CheckpointError, ConfigError, ConversionError, DistributedError, FileExistsError,
            PathError, TrainingDiverged, ValueError) as e:  # fmt: skip
        sys.exit(f"error: {e}")
    except jax.errors.JaxRuntimeError as e:
        exit_if_out_of_memory(e)
        raise


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    run_program(main, lambda: "no results were written; the same command starts this run again")
