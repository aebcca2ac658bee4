"""Label-efficient downstream adaptation: classification, segmentation and enhancement."""
