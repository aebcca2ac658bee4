"""Downstream metrics: classification, segmentation and image quality (enhancement)."""
