"""What the command-line entry points share."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for a bad ``--config.field=value`` override."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).replace("\\n", " ").replace("\\", "").replace("'", "")
        sys.exit(f"error: invalid --config override: {message}")
