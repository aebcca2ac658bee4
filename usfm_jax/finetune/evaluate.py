"""Evaluation of a fine-tuned model on a split: predictions, metrics, tables, overlays.

Metrics (``usfm_jax.metrics``): classification accuracy, balanced accuracy, macro F1 and ROC
AUC; segmentation Dice, IoU and HD95 (pixels) per image and foreground class, averaged over
images where the class is in the truth or the prediction (``absent`` counts the others; HD95
over those where it is finite, ``hd95_undefined`` counting where one mask is empty); enhancement
PSNR and SSIM of the output and, as the baseline, of the input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import PIL.Image
import PIL.ImageDraw
from etils import epath
from scipy import ndimage

from usfm_jax.data.layout import IGNORE
from usfm_jax.finetune.data import TARGET_KEY
from usfm_jax.metrics import classification, image_quality, segmentation

# The metric each task selects its best checkpoint by (higher is better), and the table's order.
METRICS = {
    "classify": ("balanced_accuracy", "accuracy", "macro_f1", "auc"),
    "segment": ("dice", "iou", "hd95", "hd95_undefined"),
    "enhance": ("psnr", "ssim", "psnr_input", "ssim_input"),
}
LOWER_IS_BETTER = frozenset({"hd95", "hd95_undefined"})
# Scores of the inputs themselves (the degraded images against their targets): the baseline
# a model should beat, the same at every evaluation, so never a metric to select by.
BASELINES = frozenset({"psnr_input", "ssim_input"})


def collect(
    predict: Callable[[dict[str, np.ndarray]], np.ndarray],
    batches: Iterable[dict[str, np.ndarray]],
    task: str,
) -> dict[str, np.ndarray]:
    """Runs ``predict`` over padded batches; returns the valid rows' ``image``, ``truth`` and
    ``prediction`` (host arrays)."""
    images, truths, preds = [], [], []
    for batch in batches:
        valid = batch["valid"]
        preds.append(np.asarray(jax.device_get(predict(batch)))[valid])
        images.append(batch["image"][valid])
        truths.append(batch[TARGET_KEY[task]][valid])
    return {
        "image": np.concatenate(images),
        "truth": np.concatenate(truths),
        "prediction": np.concatenate(preds),
    }


def compute_metrics(task: str, out: Mapping[str, np.ndarray], num_classes: int) -> dict[str, float]:
    """The task's metrics of collected predictions."""
    truth, pred = out["truth"], out["prediction"]
    if task == "classify":
        labels = pred.argmax(-1)
        return {
            "balanced_accuracy": classification.balanced_accuracy(truth, labels),
            "accuracy": classification.accuracy(truth, labels),
            "macro_f1": classification.macro_f1(truth, labels),
            "auc": classification.roc_auc(truth, pred),
        }
    if task == "segment":
        per_image: dict[str, list[float]] = {"dice": [], "iou": [], "hd95": []}
        for p, t in zip(pred, truth, strict=True):
            ignore = t == IGNORE
            scores = segmentation.per_class(np.where(ignore, 0, p), np.where(ignore, 0, t),
                                            num_classes)  # fmt: skip
            for name, values in scores.items():
                per_image[name].extend(values)
        dice, iou, hd = (np.asarray(per_image[name]) for name in ("dice", "iou", "hd95"))
        absent = np.isnan(dice)  # the class in neither mask: left out of every mean
        finite = np.isfinite(hd)
        return {
            "dice": float(dice[~absent].mean()) if (~absent).any() else math.nan,
            "iou": float(iou[~absent].mean()) if (~absent).any() else math.nan,
            "hd95": float(hd[finite].mean()) if finite.any() else math.inf,
            "hd95_undefined": int((~finite & ~absent).sum()),
            "absent": int(absent.sum()),
        }
    target = truth.astype(np.float32) / 255.0
    noisy = out["image"].astype(np.float32) / 255.0
    return {
        "psnr": float(np.mean(image_quality.psnr(pred, target))),
        "ssim": float(np.mean(image_quality.ssim(pred, target))),
        "psnr_input": float(np.mean(image_quality.psnr(noisy, target))),
        "ssim_input": float(np.mean(image_quality.ssim(noisy, target))),
    }


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(new)
    return new < best if metric in LOWER_IS_BETTER else new > best


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ overlays

_GREEN, _RED = (40, 220, 60), (235, 50, 40)
OVERLAY_HEIGHT = 256  # overlays of smaller images are enlarged (nearest) to about this height
CAPTION_HEIGHT = 16  # pixels of the classification overlays' caption band


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray.reshape(*gray.shape[:2], 1), 3, axis=-1).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay(
    task: str, image: np.ndarray, truth: Any, pred: Any, classes: Sequence[str]
) -> PIL.Image.Image:
    """One test case as a picture: classification with a border green (right) or red (wrong)
    and the predicted class and probability; segmentation with the truth outlined in green
    and the prediction filled in red; enhancement as input | output | target."""
    gray = _rgb(image)
    if task == "classify":
        label = int(np.argmax(pred))
        colour = _GREEN if label == int(truth) else _RED
        canvas = np.zeros((gray.shape[0] + 8, gray.shape[1] + 8, 3), np.uint8)
        canvas[...] = colour
        canvas[4:-4, 4:-4] = gray
        zoom = max(1, OVERLAY_HEIGHT // canvas.shape[0])
        picture = PIL.Image.fromarray(canvas).resize(
            (canvas.shape[1] * zoom, canvas.shape[0] * zoom), PIL.Image.NEAREST
        )
        text = f"{classes[label]} {pred[label]:.2f} (true: {classes[int(truth)]})"
        captioned = PIL.Image.new("RGB", (picture.width, picture.height + CAPTION_HEIGHT))
        captioned.paste(picture, (0, CAPTION_HEIGHT))  # the caption on black, above the image
        PIL.ImageDraw.Draw(captioned).text((4, 3), text, fill=colour)
        return captioned
    if task == "segment":
        out = gray.astype(np.float32)
        predicted = (pred > 0) & (pred != IGNORE)
        out[predicted] = 0.6 * out[predicted] + 0.4 * np.asarray(_RED, np.float32)
        out[_outline((truth > 0) & (truth != IGNORE))] = _GREEN
        return PIL.Image.fromarray(out.astype(np.uint8))
    enhanced = (np.clip(pred[..., 0], 0, 1) * 255 + 0.5).astype(np.uint8)
    row = np.concatenate([image[..., 0], enhanced, truth[..., 0]], axis=1)
    return PIL.Image.fromarray(row)


def write_overlays(
    directory: epath.Path,
    task: str,
    out: Mapping[str, np.ndarray],
    classes: Sequence[str],
    limit: int,
) -> int:
    """PNG overlays of the first ``limit`` cases of a split into ``directory``; returns the
    number written."""
    directory.mkdir(parents=True, exist_ok=True)
    count = min(limit, len(out["image"]))
    for i in range(count):
        picture = overlay(task, out["image"][i], out["truth"][i], out["prediction"][i], classes)
        zoom = max(1, OVERLAY_HEIGHT // picture.height)  # small inputs: pixels stay visible
        picture = picture.resize((picture.width * zoom, picture.height * zoom), PIL.Image.NEAREST)
        with (directory / f"{i:04d}.png").open("wb") as f:
            picture.save(f, format="PNG")
    return count
