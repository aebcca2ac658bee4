"""Downstream metrics against independent references: scikit-learn, scikit-image, hand-computed
masks and brute-force surface distances."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn import metrics as skm

from usfm_jax.finetune import evaluate
from usfm_jax.metrics import classification, image_quality, segmentation

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_classification_metrics_match_scikit_learn(num_classes):
    for trial in range(5):
        labels = RNG.integers(0, num_classes, 200)
        scores = RNG.dirichlet(np.ones(num_classes), 200)
        scores[np.arange(200), labels] += RNG.uniform(0, 0.6, 200)  # informative, not perfect
        scores = np.round(scores / scores.sum(1, keepdims=True), 2)  # with ties ...
        scores[:, -1] = 1 - scores[:, :-1].sum(1)  # ... and still probabilities
        predicted = scores.argmax(1)
        if trial == 0:
            predicted[predicted == num_classes - 1] = 0  # a class never predicted
        assert classification.accuracy(labels, predicted) == skm.accuracy_score(labels, predicted)
        np.testing.assert_allclose(
            classification.balanced_accuracy(labels, predicted),
            skm.balanced_accuracy_score(labels, predicted),
        )
        np.testing.assert_allclose(
            classification.macro_f1(labels, predicted),
            skm.f1_score(labels, predicted, average="macro", zero_division=0),
        )
        expected = (
            skm.roc_auc_score(labels, scores[:, 1])
            if num_classes == 2
            else skm.roc_auc_score(labels, scores, multi_class="ovr", average="macro")
        )
        np.testing.assert_allclose(classification.roc_auc(labels, scores), expected)


def test_auc_edge_cases():
    assert classification.binary_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.2, 0.1])) == 1
    assert classification.binary_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert np.isnan(classification.binary_auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_dice_and_iou_on_hand_computed_masks():
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[0:4, 0:4] = True  # 16 pixels
    b[2:6, 0:4] = True  # 16 pixels, 8 shared
    assert segmentation.dice(a, b) == 2 * 8 / 32
    assert segmentation.iou(a, b) == 8 / 24
    empty = np.zeros((8, 8), bool)
    assert np.isnan(segmentation.dice(empty, empty)) and np.isnan(segmentation.iou(empty, empty))
    assert segmentation.dice(a, empty) == 0.0


def _brute_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """All pairwise distances between the two boundaries, by numpy broadcasting."""
    pa = np.argwhere(segmentation.boundary(a)).astype(float)
    pb = np.argwhere(segmentation.boundary(b)).astype(float)
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_against_brute_force_and_a_known_shift():
    a = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    shifted = np.roll(a, 3, axis=1)
    assert segmentation.hd95(a, shifted) == 3.0  # every boundary point moves by 3
    assert segmentation.hd95(a, shifted, spacing=0.5) == 1.5
    for _ in range(5):
        p = RNG.uniform(size=(40, 40)) > 0.7
        t = np.zeros((40, 40), bool)
        t[RNG.integers(0, 20) :][:, RNG.integers(0, 20) :] = True
        np.testing.assert_allclose(segmentation.hd95(p, t), _brute_hd95(p, t))
    empty = np.zeros((40, 40), bool)
    assert np.isnan(segmentation.hd95(empty, empty)) and segmentation.hd95(a, empty) == np.inf


def test_per_class_segmentation_metrics():
    truth = np.zeros((16, 16), int)
    truth[2:8, 2:8], truth[10:14, 10:14] = 1, 2
    predicted = truth.copy()
    predicted[10:14, 10:12] = 0
    out = segmentation.per_class(predicted, truth, num_classes=3)
    assert out["dice"] == [1.0, 2 * 8 / 24] and out["iou"] == [1.0, 0.5]
    assert out["hd95"][0] == 0.0 and out["hd95"][1] > 0
    only_one = segmentation.per_class(np.where(truth == 2, 0, truth), truth * 0, num_classes=3)
    assert only_one["dice"][0] == 0.0 and np.isnan(only_one["dice"][1])


def test_segmentation_means_leave_out_images_without_the_class():
    """Two images with a lesion, predicted 6 px off (Dice 0.7, HD95 6), two without one and
    predicted without one: the means are those of the first two, the others counted as absent;
    a lesion predicted on an image without one scores Dice 0."""
    lesion = np.zeros((2, 32, 32), np.int32)
    lesion[:, 8:28, 4:24] = 1
    pred = np.roll(lesion, 6, axis=2)
    normal = np.zeros((2, 32, 32), np.int32)
    out = {"truth": np.concatenate([lesion, normal]), "prediction": np.concatenate([pred, normal])}
    m = evaluate.compute_metrics("segment", out, num_classes=2)
    assert m["dice"] == pytest.approx(2 * 14 * 20 / 800) and m["hd95"] == 6.0
    assert m["absent"] == 2 and m["hd95_undefined"] == 0
    out["prediction"] = np.concatenate([pred, lesion[:1], normal[:1]])  # a false positive
    m = evaluate.compute_metrics("segment", out, num_classes=2)
    assert m["dice"] == pytest.approx(2 * 0.7 / 3) and m["absent"] == 1
    assert m["hd95"] == 6.0 and m["hd95_undefined"] == 1


def test_psnr_and_ssim_match_scikit_image():
    clean = RNG.uniform(size=(3, 48, 40)).astype(np.float32)
    clean[1] = np.linspace(0, 1, 40)[None, :] * np.ones((48, 1))  # a smooth ramp
    noisy = np.clip(clean + RNG.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
    psnr = np.asarray(image_quality.psnr(noisy, clean))
    ssim = np.asarray(image_quality.ssim(noisy[..., None], clean[..., None]))  # [B, H, W, 1]
    for i in range(3):
        np.testing.assert_allclose(
            psnr[i], peak_signal_noise_ratio(clean[i], noisy[i], data_range=1.0), rtol=1e-5
        )
        expected = structural_similarity(
            clean[i].astype(np.float64),
            noisy[i].astype(np.float64),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        np.testing.assert_allclose(ssim[i], expected, atol=1e-5)
    assert np.asarray(image_quality.ssim(clean, clean)).min() > 0.9999
