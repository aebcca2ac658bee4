"""Training observability: console lines and progress bar, TensorBoard scalars and image grids.

Metrics stay on device between logging points (no per-step host sync); at a logging point they
are fetched together and averaged over the window. Branch losses arrive as per-step sums and
counts so that windows in which a branch did not run every step (``combine=alternate``) still
average correctly. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
import tqdm
from absl import logging
from tensorboardX import SummaryWriter

from usfm_jax.objectives.dual import BRANCHES

_CHATTY = ("/orbax/", "/grain/", "/jax/_src/")  # libraries that narrate every file and step


def quiet_library_logs(level: int = std_logging.WARNING) -> None:
    """Hides what orbax, grain and JAX log below ``level`` (a few hundred INFO lines per run);
    usfm_jax's own lines still show."""
    logging.get_absl_handler().python_handler.addFilter(
        lambda record: (
            record.levelno >= level or not any(part in record.pathname for part in _CHATTY)
        )
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


def _open_log(path: str, start_step: int):
    """Opens metrics.jsonl for appending, keeping only the rows of steps <= ``start_step``."""
    kept = []
    if start_step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short by a killed process
    with open(path + ".tmp", "w") as f:  # replaced in one step: a kill here loses nothing
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


class Reporter:
    """Collects per-step metrics and writes them to stdout, TensorBoard and metrics.jsonl."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, batch_size: int):
        self.is_main = jax.process_index() == 0
        self.batch_size = batch_size
        self.history: list[Mapping[str, jax.Array]] = []
        self.restart_timer(start_step)
        self.writer = self.jsonl = None
        if self.is_main:
            # A resumed run drops what was logged after its checkpoint (it logs those steps again).
            self.writer = SummaryWriter(
                os.path.join(workdir, "tensorboard"),
                purge_step=start_step + 1 if start_step else None,
            )
            self.jsonl = _open_log(os.path.join(workdir, "metrics.jsonl"), start_step)
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
            self.jsonl.write(json.dumps({"step": step, **means}) + "\n")
            self.jsonl.flush()
            line = " ".join(f"{k}={v:.4g}" for k, v in means.items())
            self.progress.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
            self.progress.write(f"step {step}: {line}")
        return means

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
            self.jsonl.close()
