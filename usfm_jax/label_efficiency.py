"""Label-efficiency study: fine-tune every initialisation at every label fraction and seed.

    python -m usfm_jax.label_efficiency --config configs/finetune/classify.py --out runs/study \
        --inits scratch,usfm=runs/demo,urfm=weights.safetensors \
        --fractions 0.05,0.2,1.0 --seeds 3 \
        [--pretrain dual=configs/ablations/dual.py:demo,sp=configs/ablations/spatial_only.py:demo]

``--inits``: ``scratch`` (random initialisation) or ``NAME=PATH`` / ``PATH`` (anything
``--config.init`` accepts). ``--pretrain NAME=CONFIG[:ARG],...`` first pre-trains each config
(``usfm_jax.train``, in ``OUT/pretrain/NAME``; resumed if interrupted) and adds it as an
initialisation: the way to compare masking strategies of ``configs/ablations/``.
``--config.FIELD=VALUE`` overrides the fine-tuning config of every run; the study sets
``init``, ``label_fraction`` and ``seed`` itself (from ``--inits``, ``--fractions`` and
``--seeds``), so a config that sets them otherwise is an error, and so is an architecture or
normalisation override that an init's checkpoint contradicts (it describes the scratch encoder).

Every run writes ``OUT/runs/INIT/fFRACTION/sSEED`` (a finished run is not repeated, so an
interrupted study continues where it stopped). Then: ``OUT/results.csv`` (one row per run, a
``test_METRIC`` column per test metric), ``OUT/results.md`` (mean +- std over seeds),
``OUT/label_efficiency.png`` (the selection metric vs the label fraction, one line per
initialisation, error bars = std over seeds).

A run's ``study_run.json`` holds the config the study asked for and, under ``init_identity``,
what its init's weights were (``init_identity``: the step and parameter fingerprint of a
usfm_jax checkpoint or export, the SHA-256 of PyTorch weights). A finished run is reused only
if both are the same again: new weights at an init's path (pre-training continued, an export or
a weights file replaced) are an error, never a silent reuse. So is an ``OUT/pretrain/NAME``
whose newest checkpoint was written with another config than ``--pretrain NAME`` asks for.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from usfm_jax.checkpoint import CheckpointError, config_changes
from usfm_jax.cli import load_config, run_program, start_jax
from usfm_jax.config_validation import ConfigError, require_kind, validate
from usfm_jax.convert import Architecture, ConversionError, Normalization
from usfm_jax.export import find_checkpoint, read_record
from usfm_jax.finetune import evaluate
from usfm_jax.finetune.run import finetune, initial_encoder
from usfm_jax.finetune.validation import check_init_overrides, init_overrides, validate_finetune
from usfm_jax.paths import as_path, work_directory
from usfm_jax.pretrained import torch_weights_file
from usfm_jax.reporting import TrainingDiverged, quiet_library_logs, strict_json

SCRATCH = "scratch"
STUDY_CONFIG = "study_run.json"  # in each run's workdir: the config the study asked for
IDENTITY = "init_identity"  # ... and, under this key, what its init's weights were


def parse_named(text: str, flag: str) -> list[tuple[str, str]]:
    """``"a=x,y"`` -> [("a", "x"), ("y", "y")] (a bare value names itself, its basename for a
    path); names must be unique."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            name, value = os.path.basename(os.path.normpath(item)) or item, item
        if not name or not value:
            raise ValueError(f"--{flag}: cannot read {item!r} (expected NAME=VALUE or VALUE)")
        pairs.append((name, value))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"--{flag}: names must be unique, got {names}")
    return pairs


def parse_fractions(text: str) -> list[float]:
    try:
        fractions = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--fractions {text!r}: expected numbers, e.g. 0.05,0.2,1.0") from None
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"--fractions {text!r}: expected values in (0, 1]")
    return fractions


def load_pretrain_configs(
    specs: Sequence[tuple[str, str]], steps: int | None
) -> list[tuple[str, ml_collections.ConfigDict]]:
    """The (name, config) of each ``--pretrain NAME=CONFIG[:ARG]``, validated (on this
    machine's devices)."""
    if steps is not None and steps < 1:
        raise ValueError(f"--pretrain_steps must be >= 1, got {steps}")
    configs = []
    for name, spec in specs:
        config = load_config(spec)
        require_kind(config, "pre-training", where=f"--pretrain {name}={spec}")
        if steps:
            config.total_steps = steps
        try:
            validate(config, jax.device_count())
        except ConfigError as e:
            raise ConfigError(f"--pretrain {name}={spec}: {e}") from None
        configs.append((name, config))
    return configs


def check_pretrain_workdirs(
    configs: Sequence[tuple[str, ml_collections.ConfigDict]], out: str
) -> None:
    """Refuses an OUT/pretrain/NAME whose newest checkpoint was written with another config
    than ``--pretrain NAME`` asks for (resuming it would label those weights with this config,
    or continue them under it)."""
    for name, config in configs:
        workdir = os.path.join(out, "pretrain", name)
        try:
            source = find_checkpoint(workdir)
        except CheckpointError:  # no finished checkpoint yet: pre-trained (or resumed) as asked
            continue
        changes = config_changes(read_record(source).config, config.to_dict())
        if changes:
            raise ValueError(
                f"{workdir} holds step {source.name} pre-trained with another config than "
                f"--pretrain {name} asks for ({'; '.join(changes[:5])}): use another --out "
                f"(or --pretrain name), or remove {workdir} to pre-train it again"
            )


def pretrain_all(configs: Sequence[tuple[str, ml_collections.ConfigDict]], out: str) -> list:
    """Pre-trains each (name, config) into OUT/pretrain/NAME (resuming one interrupted with
    the same config; any other config there is an error, before any training); returns
    (name, workdir)."""
    from usfm_jax.train import train  # here: only this path needs the pre-training loop

    check_pretrain_workdirs(configs, out)
    inits = []
    for name, config in configs:
        workdir = os.path.join(out, "pretrain", name)
        logging.info("pre-training %s in %s", name, workdir)
        train(config, workdir)
        inits.append((name, workdir))
    return inits


# The fields the study sets for every run, their value in a config the study accepts, and the
# flag that sets them: any other value would be silently replaced.
STUDY_FIELDS = {"init": ("", "--inits"), "label_fraction": (1.0, "--fractions"),
                "seed": (0, "--seeds")}  # fmt: skip


def init_identity(path: str) -> dict[str, Any] | None:
    """What the weights of the init at ``path`` are, without reading them: None for scratch
    (the config describes it); for a usfm_jax workdir (its newest step), step directory or
    export, the step and the SHA-256 (16 hex digits) of the per-array fingerprints saved with
    it; for PyTorch weights, the file's SHA-256."""
    if path == SCRATCH:
        return None
    torch_file = torch_weights_file(as_path(path))
    if torch_file is not None:
        with torch_file.open("rb") as f:
            return {"sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    record = read_record(find_checkpoint(path))
    digest = hashlib.sha256(json.dumps(record.fingerprint, sort_keys=True).encode()).hexdigest()
    return {"step": record.step, "fingerprint": digest[:16]}


def describe_identity(identity: dict[str, Any] | None) -> str:
    """``init_identity``'s value in words: "step 600, fingerprint 1a2b..." or "sha256 ..."."""
    if identity is None:
        return "none recorded"
    return ", ".join(f"{key} {value}" for key, value in identity.items())


def check_study(
    config: ml_collections.ConfigDict,
    inits: Sequence[tuple[str, str]],
    seeds: int,
    pretrain: Sequence[tuple[str, ml_collections.ConfigDict]] = (),
    overrides: Mapping[str, Any] | None = None,
) -> None:
    """What can be checked before the first run: the fine-tuning config with each init, the
    inits' paths, the seeds, the command line's ``overrides`` against what each init brings;
    ``pretrain`` holds the (name, config) of the inits that pre-training will add."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    names = [name for name, _ in inits] + [name for name, _ in pretrain]
    if len(set(names)) != len(names):
        raise ValueError(f"--inits and --pretrain: names must be unique, got {names}")
    for name, path in inits:  # all of them now, not when their turn comes
        if path != SCRATCH and not os.path.exists(path):
            raise ValueError(f"--inits {name}={path}: no such file or directory")
    require_kind(config, "fine-tuning")
    for field, (value, flag) in STUDY_FIELDS.items():
        if config[field] != value:
            raise ConfigError(f"config.{field}={config[field]!r}: the study sets it for every "
                              f"run from {flag}; leave it at {value!r}")  # fmt: skip
    # validate_finetune checks the encoder fields only without an init (a checkpoint brings its
    # own, checked when read): once for scratch, once for any checkpoint
    scratch = {path == SCRATCH for _, path in inits} | ({False} if pretrain else set())
    for from_scratch in scratch:
        run = copy.deepcopy(config)
        run.init = "" if from_scratch else "a checkpoint"
        validate_finetune(run, jax.device_count())
    if init_overrides(overrides or {}):  # what each init brings: read only when it matters
        run = copy.deepcopy(config)
        for name, path in inits:
            if path != SCRATCH:
                run.init = path
                _, arch, normalization = initial_encoder(run)
                check_init_overrides(run, overrides, arch, normalization, f"--inits {name}={path}")
        for name, pretrain_config in pretrain:
            run.init = name
            arch = Architecture.from_config(pretrain_config.model, pretrain_config.image_size)
            normalization = Normalization.from_json(pretrain_config.normalization)
            check_init_overrides(run, overrides, arch, normalization, f"--pretrain {name}")


def run_grid(
    config: ml_collections.ConfigDict,
    inits: Sequence[tuple[str, str]],
    fractions: Sequence[float],
    seeds: int,
    out: str,
    overrides: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tunes every (init, fraction, seed); returns one record per run (``overrides``: as
    for ``finetune``). Every finished run is checked (``_check_same_run``) before the first
    new one starts."""
    grid = []
    for name, path in inits:
        identity = init_identity(path)  # once per init: its weights, now
        for fraction in fractions:
            for seed in range(seeds):
                workdir = os.path.join(out, "runs", name, f"f{fraction:g}", f"s{seed}")
                run = copy.deepcopy(config)
                run.init = "" if path == SCRATCH else path
                run.label_fraction = fraction
                run.seed = seed
                if os.path.exists(os.path.join(workdir, "results.json")):
                    asked = os.path.join(workdir, STUDY_CONFIG)
                    _check_same_run(run, asked, identity, f"{name}={path}")
                grid.append((name, fraction, seed, workdir, run, identity))
    records = []
    for i, (name, fraction, seed, workdir, run, identity) in enumerate(grid):
        if os.path.exists(os.path.join(workdir, "results.json")):
            with open(os.path.join(workdir, "results.json")) as f:
                results = json.load(f)
        else:
            print(f"[{i + 1}/{len(grid)}] {name}, fraction {fraction:g}, seed {seed}", flush=True)
            os.makedirs(workdir, exist_ok=True)
            record = {**json.loads(run.to_json_best_effort()), IDENTITY: identity}
            with open(os.path.join(workdir, STUDY_CONFIG), "w") as f:
                json.dump(record, f, indent=2)
            # as results.json holds them: a study continued later summarises the same values
            results = json.loads(strict_json(finetune(run, workdir, overrides)))
        for split in ("val", "test"):  # undefined (non-finite) metrics are stored as null
            results[split] = {k: np.nan if v is None else v for k, v in results[split].items()}
        # the study's name of the init, not the run's path of it
        records.append({**results, "init": name, "fraction": fraction, "seed": seed})
    return records


def _check_same_run(
    run: ml_collections.ConfigDict, asked: str, identity: dict[str, Any] | None, init: str
) -> None:
    """A finished run is reused only if it was asked for with this config and its init
    (``init``: NAME=PATH) had the weights of ``identity``."""
    if not os.path.exists(asked):
        raise ValueError(
            f"{os.path.dirname(asked)} holds a finished run without the {STUDY_CONFIG} that "
            "says how the study asked for it: use another --out (or remove the run)"
        )
    with open(asked) as f:
        saved = json.load(f)
    recorded = saved.pop(IDENTITY, None)  # absent: written before identities were recorded
    changes = config_changes(saved, run.to_dict())
    if changes:
        raise ValueError(
            f"{os.path.dirname(asked)} was fine-tuned with another config ("
            + "; ".join(changes[:5])
            + "): use another --out for the changed study, or remove the old runs"
        )
    if recorded != identity:
        runs = os.path.dirname(os.path.dirname(os.path.dirname(asked)))  # OUT/runs/NAME
        raise ValueError(
            f"{os.path.dirname(asked)} was fine-tuned from other weights of init {init} "
            f"(then: {describe_identity(recorded)}; now: {describe_identity(identity)}): use "
            f"another --out for the new weights, or remove {runs} to fine-tune them again"
        )


def write_csv(records: Sequence[dict[str, Any]], path: str) -> None:
    metrics = list(records[0]["test"])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["init", "label_fraction", "seed", "train_images", "best_step",
                         *(f"test_{m}" for m in metrics)])  # fmt: skip
        for r in records:
            writer.writerow([r["init"], r["fraction"], r["seed"], r["train_images"],
                             r["best_step"], *(r["test"][m] for m in metrics)])  # fmt: skip


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (init, fraction): mean and sample standard deviation (NaN for one seed) over seeds
    of every test metric."""
    rows = []
    order = list(dict.fromkeys(r["init"] for r in records))  # the study's order of inits
    keys = sorted({(r["init"], r["fraction"]) for r in records},
                  key=lambda k: (k[1], order.index(k[0])))  # fmt: skip
    for init, fraction in keys:
        group = [r for r in records if r["init"] == init and r["fraction"] == fraction]
        row = {"init": init, "fraction": fraction, "seeds": len(group),
               "train_images": group[0]["train_images"]}  # fmt: skip
        for metric in group[0]["test"]:
            values = np.array([r["test"][metric] for r in group], np.float64)
            std = values.std(ddof=1) if len(values) > 1 else np.nan
            row[metric] = (float(values.mean()), float(std))
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], task: str) -> str:
    metrics = [m for m in evaluate.METRICS[task] if m in rows[0]]
    cells = [
        {
            "label fraction": f"{r['fraction']:g}",
            "labelled images": r["train_images"],
            "init": r["init"],
            **{m: _mean_std(*r[m]) for m in metrics},
        }
        for r in rows
    ]
    columns = ["label fraction", "labelled images", "init", *metrics]
    return evaluate.markdown_table(cells, columns)


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.3f}" if np.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def plot(rows: Sequence[dict[str, Any]], metric: str, path: str, title: str) -> None:
    """The metric (mean, std error bars) against the label fraction, one line per init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for init in dict.fromkeys(r["init"] for r in rows):
        mine = [r for r in rows if r["init"] == init]
        x = [r["fraction"] for r in mine]
        mean, std = zip(*(r[metric] for r in mine), strict=True)
        ax.errorbar(x, mean, yerr=np.nan_to_num(std), marker="o", capsize=3, label=init)
    ax.set_xscale("log")
    ax.set_xticks([r["fraction"] for r in rows], [f"{r['fraction']:g}" for r in rows])
    ax.set_xlabel("label fraction")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def study(
    config: ml_collections.ConfigDict,
    inits: Sequence[tuple[str, str]],
    fractions: Sequence[float],
    seeds: int,
    out: str,
    overrides: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Runs the grid and writes results.csv, results.md and label_efficiency.png into ``out``;
    returns the summary rows. ``overrides``: the command line's ``--config.FIELD`` values,
    checked against each init by its fine-tuning (``main`` checks them before any run)."""
    check_study(config, inits, seeds)
    os.makedirs(out, exist_ok=True)
    records = run_grid(config, inits, fractions, seeds, out, overrides)
    write_csv(records, os.path.join(out, "results.csv"))
    rows = summarize(records)
    metric = config.eval.select or evaluate.METRICS[config.task][0]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(rows, config.task))
    plot(rows, metric, os.path.join(out, "label_efficiency.png"),
         f"{config.task}: test {metric} (mean ± sample std over {seeds} seeds)")  # fmt: skip
    return rows


def main(argv: list[str]) -> None:
    del argv  # parse_flags refuses positional arguments
    quiet_library_logs()
    f = flags.FLAGS
    start_jax()
    try:
        inits = parse_named(f.inits, "inits")
        fractions = parse_fractions(f.fractions)
        pretrain = load_pretrain_configs(parse_named(f.pretrain, "pretrain"), f.pretrain_steps)
        overrides = config_flags.get_override_values(f["config"])
        check_study(f.config, inits, f.seeds, pretrain, overrides)
        work_directory(f.out, "--out")
        inits += pretrain_all(pretrain, f.out)
        rows = study(f.config, inits, fractions, f.seeds, f.out, overrides)
    except (CheckpointError, ConfigError, ConversionError, OSError, TrainingDiverged,
            ValueError) as e:  # fmt: skip
        sys.exit(f"error: {e}")
    print(markdown(rows, f.config.task))


if __name__ == "__main__":  # flags defined here, as the module is importable
    config_flags.DEFINE_config_file("config", None, "Fine-tuning config file (python).")
    flags.DEFINE_string("out", None, "Directory of the study (runs, table, plot).")
    flags.DEFINE_string("inits", SCRATCH, "scratch and / or NAME=CHECKPOINT, comma-separated.")
    flags.DEFINE_string("fractions", "0.05,0.2,1.0", "Label fractions, comma-separated.")
    flags.DEFINE_integer("seeds", 3, "Seeds per (init, fraction).")
    flags.DEFINE_string(
        "pretrain", "", "NAME=CONFIG[:ARG],...: pre-train these first and add them as inits."
    )
    flags.DEFINE_integer("pretrain_steps", None, "Override total_steps of every --pretrain.")
    flags.mark_flags_as_required(["config", "out"])
    run_program(main, lambda: "finished runs are kept; the same command continues the study")
