"""What an ingested dataset directory holds, as its writer (``ingest``) and its readers
(pre-training's and fine-tuning's pipelines) agree on it."""

VERSION = "1.0.0"  # the TFDS version directory: DATA_DIR/NAME/1.0.0
CARD = "dataset_card.json"  # per-organ counts and index ranges per split, options, skips
SPLITS = ("train", "val", "test")  # patients are split as a whole
IGNORE = 255  # the mask value that means "not labelled": excluded from losses and metrics
