"""
A massive activation followed over training: the same probe measurement at every point of a trajectory (the
checkpoints a run kept with keep_checkpoints, a list of checkpoints, or a hub model's revisions, such as
Pythia's step0 ... step143000) as one table and one plot.

    points = trajectory_points(["out-traj/bb"], [])                  # a run folder: its kept checkpoints
    points = trajectory_points(["EleutherAI/pythia-70m"], ["step0", "step1000"])
    rows = measure_trajectory(points, "cpu", probe=dict(batches=4, batch_size=8), on_row=print)
    write_trajectory(rows, "reports/traj")                           # trajectory.md, .json, .png

At each point: the massive entry (the top-1 entry of the layer with the largest top-1/median ratio, as the
analysis report names it), Sun et al.'s hits (|h| > 100 and >= 1000 x the layer's median), Gu et al.'s sink rate,
and the loss change when the entry is zeroed, or set to its mean, where it first appears (sinkgpt.probes.ablate).

May import: sinkgpt.checkpoint, sinkgpt.common, sinkgpt.measure, sinkgpt.plots, sinkgpt.pretrained, sinkgpt.probes,
sinkgpt.report, sinkgpt.stats, sinkgpt.tokenizer.
"""

import json
import os
import re
from dataclasses import dataclass

import torch

from sinkgpt.checkpoint import (checkpoint_path, is_pretrained_folder, kept_checkpoints, load_model,
                                looks_like_hub_name)
from sinkgpt.common import plain
from sinkgpt.measure import AnalyzeError
from sinkgpt.plots import plot_trajectory
from sinkgpt.pretrained import resolve_folder
from sinkgpt.probes import ablate, probe_batches
from sinkgpt.report import build_report, fmt, token_label
from sinkgpt.stats import MASSIVE_ABS, MASSIVE_RATIO
from sinkgpt.tokenizer import load_tokenizer


@dataclass
class Point:
    """One point of a trajectory: what to load, and its training step when the name tells it."""
    label: str  # a checkpoint path, or name@revision
    target: str  # what load_model reads
    revision: str | None = None
    step: int | None = None


def revision_step(revision):
    """The training step a revision name gives ('step1000' -> 1000, Pythia's naming), else None."""
    match = re.fullmatch(r"step(\d+)", revision)
    return int(match.group(1)) if match else None


def parse_revisions(text):
    """--revisions 'step0,step1,...' as a list (None when the flag is not given)."""
    if text is None:
        return None
    revisions = [r.strip() for r in text.split(",") if r.strip()]
    if not revisions:
        raise AnalyzeError("--revisions is empty: give revisions such as step0,step1000")
    return revisions


def trajectory_points(targets, revisions=None):
    """The points to measure, in order: each target as given, a run folder that kept checkpoints expanded to
    them in step order (ckpt_<iter>.pt), one hub name with --revisions expanded to its revisions. Every local
    path is checked here, and every revision resolved (fetched, or found in the local cache), before any
    measurement starts."""
    if not targets:
        raise AnalyzeError("no checkpoints given: name checkpoints, run folders, or one hub name with --revisions")
    if revisions is not None:
        if len(targets) != 1 or not looks_like_hub_name(targets[0]):
            raise AnalyzeError("--revisions takes one hub name (such as EleutherAI/pythia-70m), got "
                               + " ".join(targets))
        points = [Point(f"{targets[0]}@{r}", targets[0], r, revision_step(r)) for r in revisions]
        for point in points:
            resolve_folder(point.target, point.revision)  # a revision that does not exist: its name, at once
        return points
    points = []
    for target in targets:
        kept = kept_checkpoints(target) if os.path.isdir(target) else []
        if kept:
            points += [Point(path, path, step=step) for step, path in kept]
        elif os.path.isfile(checkpoint_path(target)) or is_pretrained_folder(target):
            points.append(Point(target, target))
        elif os.path.isdir(target):
            raise AnalyzeError(f"{target} holds no checkpoint: neither kept checkpoints (ckpt_<iter>.pt), a run "
                               "(ckpt.pt) nor a pretrained model (config.json and weights)")
        elif looks_like_hub_name(target):
            resolve_folder(target)  # a name the hub does not know: its name, at once
            points.append(Point(target, target))
        else:
            raise AnalyzeError(f"checkpoint {target} does not exist")
    return points


def first_layer_of(maps, position, dim, value, layer):
    """The first block whose output holds the entry (position, dim) at half its value or more: where it
    appears, and where Sun et al. set it to zero (`layer`, where it was found, when the value is not finite)."""
    return next((i for i, absmax in enumerate(maps) if absmax[position, dim] >= value / 2), layer)


def measure_point(target, probe):
    """One row of the table for a LoadedModel: probe batches as `probe` says (probe_batches' keywords), the
    report's measurements without quantization, and the ablation of the massive entry."""
    batches, masks, source = probe_batches(target, next(target.model.parameters()).device, **probe)
    report, maps = build_report(target.model, batches, masks, k=1, tokenizer=load_tokenizer(target.meta),
                                quantization=False)
    best = report["max_ratio"]
    value, position, dim = best["top"]
    layer = first_layer_of(maps, position, dim, value, best["layer"])
    ablation = ablate(target.model, batches, [(layer, position, dim)], masks)
    return {"loss": report["loss"], "value": value, "layer": best["layer"], "position": position, "dim": dim,
            "token": best["token"], "ratio": best["ratio"],
            "sun_hits": len(report["massive"]),
            "sun_layers": [e["layer"] for e in report["layers"] if e["sun_massive"]],
            "sink_rate": report["sink_rate"], "slot_sink_rate": report["slot_sink_rate"],
            "ablated_layer": layer, "delta_zero": ablation["delta_zero"], "delta_mean": ablation["delta_mean"],
            "data": source}


def measure_trajectory(points, device, dtype=torch.float32, probe=None, on_row=None):
    """Every point measured on the same probe batches (the same data and seed each time); on_row(row) is
    called as each is done (progress on long trajectories)."""
    rows = []
    for point in points:
        target = load_model(point.target, device, dtype, point.revision)
        step = point.step if point.step is not None else target.step
        row = {"label": point.label, "revision": point.revision, "step": step,
               **measure_point(target, probe or {})}
        rows.append(row)
        if on_row is not None:
            on_row(row)
        del target
    return rows


TABLE_HEADER = ("| step | point | loss | massive entry \\|h\\| | layer | pos | dim | token | top-1/median | "
                "Sun et al. hits (layers) | sink rate % | zeroed at layer | loss change, zeroed | "
                "loss change, mean |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row_markdown(row):
    hits = f"{row['sun_hits']}" + (f" ({', '.join(map(str, row['sun_layers']))})" if row["sun_layers"] else "")
    return (f"| {fmt(row['step'])} | {os.path.basename(row['label'])} | {fmt(row['loss'], 4)} | {fmt(row['value'], 4)} "
            f"| {row['layer']} | {row['position']} | {row['dim']} | {token_label(row['token'])} | "
            f"{fmt(row['ratio'])} | {hits} | {fmt(row['sink_rate'])} | {row['ablated_layer']} | "
            f"{row['delta_zero']:+.4f} | {row['delta_mean']:+.4f} |")


def trajectory_markdown(rows):
    return "\n".join([TABLE_HEADER] + [row_markdown(r) for r in rows]) + "\n"


def write_trajectory(rows, out_dir):
    """trajectory.md (the table and the plot), trajectory.json (every row) and trajectory.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    plot_trajectory(rows, os.path.join(out_dir, "trajectory.png"))
    criteria = (f"Massive entry: the top-1 |h| of the block output with the largest top-1/median ratio (the ratio: "
                f"each probe sequence's top-1 over its own median, the largest over the sequences). Sun et al. hits: "
                f"entries with |h| > {MASSIVE_ABS:g} and > {MASSIVE_RATIO:g} x their layer's median (the mean of "
                "the sequences' medians), as the report's 'massive' list; in parentheses the layers whose top-1 and "
                "ratio meet the criterion, as the report's per-layer column. Sink rate: Gu et al.'s share of "
                "(layer, head) pairs with alpha on position 0 > 0.3. Loss change: the entry set to zero (or to its "
                "mean over the probe sequences) at its position in every probe sequence, at the first block whose "
                "output holds at least half of it.")
    with open(os.path.join(out_dir, "trajectory.md"), "w") as f:
        f.write(f"# Trajectory\n\nProbe data: {json.dumps(rows[0]['data'])}\n\n{criteria}\n\n"
                f"{trajectory_markdown(rows)}\n![trajectory](trajectory.png)\n")
    with open(os.path.join(out_dir, "trajectory.json"), "w") as f:
        json.dump(plain({"criteria": criteria, "points": rows}), f, indent=1)
