"""Training observability: console lines and progress bar, TensorBoard scalars and image grids.

Metrics stay on device between logging points (no per-step host sync); at a logging point they
are fetched together and averaged over the window. Branch losses arrive as per-step sums and
counts so that windows in which a branch did not run every step (``combine=alternate``) still
average correctly. Only process 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging
from etils import epath

from usfm_jax.objectives.dual import BRANCHES
from usfm_jax.paths import as_path, replace_text


def _import_summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch
    whenever it is installed (only to accept its tensors), which would load PyTorch and its CUDA
    libraries into every training process (~1.5 s, and a second cuDNN beside JAX's)."""
    hide = "torch" not in sys.modules  # (if the caller loaded it, there is nothing to save)
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()

_CHATTY = ("/orbax/", "/grain/", "/jax/_src/")  # libraries that narrate every file and step


def _library_filter(level: int) -> Callable[[std_logging.LogRecord], bool]:
    def keep(record: std_logging.LogRecord) -> bool:
        return record.levelno >= level or not any(part in record.pathname for part in _CHATTY)

    return keep


def quiet_library_logs(level: int = std_logging.WARNING) -> None:
    """Hides what orbax, grain and JAX log below ``level`` (a few hundred INFO lines per run);
    usfm_jax's own lines still show. Filters absl's handler (programs run by ``absl.app``) and
    absl's logger (programs that are not, whose records reach Python's own handlers)."""
    keep = _library_filter(level)
    logging.get_absl_handler().python_handler.addFilter(keep)
    std_logging.getLogger("absl").addFilter(keep)


@contextlib.contextmanager
def library_logs_below(level: int) -> Iterator[None]:
    """``quiet_library_logs`` for one block only: what a library function (``load_params``
    called from a notebook) may do without changing its caller's logging."""
    keep, logger = _library_filter(level), std_logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def divergence(means: Mapping[str, float], limit: int, consequence: str) -> TrainingDiverged | None:
    """The error to raise if a logging window's longest run of skipped (non-finite) steps,
    ``means["bad_steps"]``, reached ``limit``; ``consequence`` says what is left of the run."""
    if means["bad_steps"] < limit:
        return None
    return TrainingDiverged(
        f"{int(means['bad_steps'])} consecutive steps had a non-finite loss or gradient "
        f"(config.max_bad_steps={limit}); {consequence}"
    )


def window_means(history: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Averages a window of per-step metrics; branch losses are weighted by their counts."""
    stacked = {k: np.asarray([m[k] for m in history], np.float64) for k in history[0]}
    out = {}
    for name, values in stacked.items():
        if name.startswith("count_"):
            continue
        if name.removeprefix("loss_") in BRANCHES:
            count = stacked[f"count_{name.removeprefix('loss_')}"].sum()
            if count:
                out[name] = float(values.sum() / count)
        elif name == "lr":
            out[name] = float(values[-1])
        elif name == "skipped":
            out[name] = float(values.sum())  # steps skipped in the window
        elif name == "bad_steps":
            out[name] = float(values.max())  # the longest run of skipped steps reached in it
        else:
            out[name] = float(values.mean())
    return out


def image_grid(rows: np.ndarray, pad: int = 2) -> np.ndarray:
    """[R, N, H, W, C] in [0, 1] -> one uint8 image [R*(H+pad), N*(W+pad), C] for TensorBoard."""
    r, n, h, w, c = rows.shape
    grid = np.ones((r, n, h + pad, w + pad, c), np.float32)
    grid[:, :, :h, :w] = rows
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(r * (h + pad), n * (w + pad), c)
    return (grid * 255).round().astype(np.uint8)


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes a non-finite float (an undefined metric, a diverged loss) as
    ``null``: Python's ``NaN`` / ``Infinity`` tokens are not JSON, and jq, JavaScript and
    most JSON readers reject the whole file over them."""

    def finite(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(value), allow_nan=False, **kwargs)


class MetricsLog:
    """metrics.jsonl: one JSON line per logging window. Written whole at every flush (object
    stores such as GCS cannot append); a resumed run drops the rows after its checkpoint."""

    def __init__(self, path: epath.Path, start_step: int):
        self.path = path
        self.lines: list[str] = []
        if start_step and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        self.lines.append(line)
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by a killed process
        self._write()

    def append(self, row: Mapping[str, float]) -> None:
        self.lines.append(strict_json(row))
        self._write()

    def _write(self) -> None:
        replace_text(self.path, "".join(line + "\n" for line in self.lines))


class Reporter:
    """Collects per-step metrics and writes them to stdout, TensorBoard and metrics.jsonl."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, batch_size: int):
        self.is_main = jax.process_index() == 0
        self.batch_size = batch_size
        self.history: list[Mapping[str, jax.Array]] = []
        self.restart_timer(start_step)
        self.writer = self.metrics_log = self.evaluation_log = None
        if self.is_main:
            # A resumed run drops what was logged after its checkpoint (it logs those steps again).
            root = as_path(workdir)
            self.writer = SummaryWriter(
                str(root / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
            self.metrics_log = MetricsLog(root / "metrics.jsonl", start_step)
            self.evaluation_log = MetricsLog(root / "evaluations.jsonl", start_step)
        self.progress = tqdm.tqdm(
            total=total_steps,
            initial=start_step,
            disable=not self.is_main,
            unit="step",
            dynamic_ncols=True,
            mininterval=2.0,
        )

    def restart_timer(self, step: int) -> None:
        """Starts timing the window anew at ``step`` (e.g. to keep compilation out of images/s)."""
        self.window_start = (step, time.perf_counter())

    def step(self, metrics: Mapping[str, jax.Array]) -> None:
        """Records one step's metrics (device arrays, not fetched yet)."""
        self.history.append(metrics)
        self.progress.update(1)

    def flush(self, step: int) -> dict[str, float]:
        """Averages the window since the last flush and writes it; returns the averages."""
        if not self.history:
            return {}
        means = window_means(jax.device_get(self.history))
        first_step, started = self.window_start
        elapsed = time.perf_counter() - started
        means["images_per_s"] = self.batch_size * (step - first_step) / max(elapsed, 1e-9)
        self.history = []
        self.restart_timer(step)
        if self.is_main:
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.metrics_log.append({"step": step, **means})
            line = " ".join(f"{k}={v:.4g}" for k, v in means.items())
            self.progress.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
            self.progress.write(f"step {step}: {line}")
        return means

    def evaluation(self, name: str, values: Mapping[str, float], step: int, note: str = "") -> None:
        """An evaluation's metrics (``name``: val, probe, ...): TensorBoard ``name/metric``,
        a line of ``evaluations.jsonl`` and of the console."""
        if not self.is_main:
            return
        for metric, value in values.items():
            self.writer.add_scalar(f"{name}/{metric}", value, step)
        self.evaluation_log.append({"step": step, "evaluation": name, **values})
        line = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.progress.write(f"step {step}: {name} {line}{note}")

    def images(self, step: int, previews: Mapping[str, jax.Array]) -> None:
        """One grid per branch: rows input / corrupted / prediction / target."""
        if not self.is_main:
            return
        for branch, rows in jax.device_get(previews).items():
            self.writer.add_image(f"preview/{branch}", image_grid(rows), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.progress.close()
        if self.is_main:
            self.writer.close()
