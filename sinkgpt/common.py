"""
What every part of the package shares: where the repository is, the error that means "bad input", and the
conversion of results to strict JSON.

Imports nothing of ours.
"""

import math
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InputError(Exception):
    """Bad input (a config key, data, a checkpoint, a prompt, an argument): the entry points print it as one
    'error:' line and exit with code 1. Each part of the package raises its own subclass."""


class RunError(InputError):
    """A problem with a run's inputs: its data, checkpoint, device or output folder."""


def plain(obj):
    """JSON-ready copy: tensors to lists, non-finite floats to None (strict JSON has no NaN)."""
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy arrays and scalars
        return plain(obj.tolist())
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj
