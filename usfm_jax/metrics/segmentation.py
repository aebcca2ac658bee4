"""Segmentation metrics per image and class on host arrays: Dice, IoU and HD95.

Masks are boolean [H, W]. Conventions (stated because the literature differs):

- two empty masks (an image without the class, and a prediction without it) are NaN in every
  metric: they say nothing about overlap or boundaries, and a mean that counted them as Dice 1
  and HD95 0 would rise with the number of images without a lesion (BUSI's normal scans).
  Means leave them out, as nnU-Net's do; a prediction on an image without the class still
  scores Dice 0.
- HD95 is the larger of the two directed 95th percentiles of the distances from one mask's
  boundary pixels to the other's (MONAI's definition; medpy pools both directions' distances),
  in pixels times ``spacing``; infinity when only one mask is empty.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    total = predicted.sum() + truth.sum()
    return math.nan if total == 0 else float(2 * (predicted & truth).sum() / total)


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    union = (predicted | truth).sum()
    return math.nan if union == 0 else float((predicted & truth).sum() / union)


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-neighbour outside it (the image border counts as outside)."""
    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def hd95(predicted: np.ndarray, truth: np.ndarray, spacing: float = 1.0) -> float:
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if not predicted.any() and not truth.any():
        return math.nan
    if not predicted.any() or not truth.any():
        return float("inf")
    a, b = boundary(predicted), boundary(truth)
    to_b = ndimage.distance_transform_edt(~b) * spacing  # distance of every pixel to b
    to_a = ndimage.distance_transform_edt(~a) * spacing
    return float(max(np.percentile(to_b[a], 95), np.percentile(to_a[b], 95)))


def per_class(
    predicted: np.ndarray, truth: np.ndarray, num_classes: int, spacing: float = 1.0
) -> dict[str, list[float]]:
    """{dice, iou, hd95: one value per foreground class 1..C-1} for integer label maps (NaN
    for a class in neither)."""
    out: dict[str, list[float]] = {"dice": [], "iou": [], "hd95": []}
    for c in range(1, num_classes):
        p, t = predicted == c, truth == c
        out["dice"].append(dice(p, t))
        out["iou"].append(iou(p, t))
        out["hd95"].append(hd95(p, t, spacing))
    return out
