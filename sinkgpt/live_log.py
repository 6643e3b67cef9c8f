"""
Live logging to Weights & Biases (wandb_log=True): every event train.py writes to metrics.jsonl on rank 0 also
goes to a wandb run, at its iteration. wandb is optional (not in requirements.txt: pip install wandb);
WANDB_MODE=offline keeps the run on disk for a later `wandb sync`.

May import: sinkgpt.common.
"""

import math
import os

from sinkgpt.common import InputError


class LiveLogError(InputError):
    """wandb_log=True without the wandb package."""


def wandb_sender(cfg):
    """A function event -> None that logs one metrics.jsonl event to a new wandb run of project wandb_project,
    named wandb_run_name (default: the out_dir's folder name), whose config is the run's."""
    try:
        import wandb
    except ImportError:
        raise LiveLogError("wandb_log=True needs the wandb package: pip install wandb (or leave wandb_log off)") from None
    name = cfg["wandb_run_name"] or os.path.basename(os.path.normpath(cfg["out_dir"]))
    run = wandb.init(project=cfg["wandb_project"], name=name, config=dict(cfg))

    def send(event):
        run.log(flat_numbers({k: v for k, v in event.items() if k != "iter"}), step=event["iter"])
    return send


def flat_numbers(values, prefix=""):
    """{'a': 1.5, 'b': [2, [3, None]]} -> {'a': 1.5, 'b/0': 2, 'b/1/0': 3}: the finite numbers of an event (per-layer
    and per-head lists become one chart each), under '/'-joined keys."""
    items = values.items() if isinstance(values, dict) else enumerate(values)
    out = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            out.update(flat_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    return out
