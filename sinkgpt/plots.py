"""
Plots of the analysis, the probes and run comparisons (PNG files). matplotlib is imported only when a plot is
drawn.

Imports nothing of ours.
"""

import math


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_activations(layers, path):
    """Sun et al.'s figure: top-1, top-2, top-3 and median |h| of each block output, log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [e["layer"] for e in layers]
    for rank in range(min(3, len(layers[0]["top"]))):
        ax.plot(x, [e["top"][rank][0] for e in layers], marker="o", label=f"top {rank + 1}")
    ax.plot(x, [e["median"] for e in layers], marker="o", color="gray", label="median")
    ax.set(yscale="log", xlabel="layer (block output)", ylabel="|activation|", title="largest and median |h|",
           xticks=x)
    ax.legend()
    return save(fig, path)


def plot_activation_map(absmax, layer, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    image = ax.imshow(absmax.cpu().numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="max |h| over sequences")
    ax.set(xlabel="dim", ylabel="position", title=f"|activation| after block {layer} (largest top-1/median)")
    return save(fig, path)


def heatmap(ax, values, title, vmax=1.0):
    """Layer x head heatmap with the numbers written in when the grid is small enough to read."""
    import numpy as np
    values = np.array(values, dtype=float)
    image = ax.imshow(values, vmin=0.0, vmax=vmax, cmap="magma", aspect="auto")
    ax.set(xlabel="head", ylabel="layer", title=title, xticks=range(values.shape[1]), yticks=range(values.shape[0]))
    if values.size <= 256:
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 * vmax else "black")
    return image


def plot_masses(layers, path):
    plt = pyplot()
    has_slot = layers[0]["slot_mass"] is not None
    fig, axes = plt.subplots(1, 2 if has_slot else 1, figsize=(10 if has_slot else 5.5, 4), squeeze=False)
    image = heatmap(axes[0, 0], [e["first_token_mass"] for e in layers], "attention mass on position 0")
    if has_slot:
        heatmap(axes[0, 1], [e["slot_mass"] for e in layers], "attention mass on the sink slot")
    fig.colorbar(image, ax=axes.ravel().tolist())
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bb(layers, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    heatmap(axes[0], [e["bb"]["dormant_bos"] for e in layers], "BOS mass, non-trigger (dormant) queries")
    heatmap(axes[1], [e["bb"]["active_bos"] for e in layers], "BOS mass, trigger (active) queries")
    ratios = [[v if v is not None and math.isfinite(v) else 0.0 for v in e["bb"]["value_ratio"]] for e in layers]
    heatmap(axes[2], ratios, "|W_o v| BOS / others (value drain)", vmax=max(1.0, max(map(max, ratios))))
    return save(fig, path)


def plot_delta(before, after, path, title):
    import numpy as np
    plt = pyplot()
    delta = np.array(after, dtype=float) - np.array(before, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    limit = max(1e-6, float(np.abs(delta).max()))
    image = ax.imshow(delta, vmin=-limit, vmax=limit, cmap="coolwarm", aspect="auto")
    ax.set(xlabel="head", ylabel="layer", title=title, xticks=range(delta.shape[1]), yticks=range(delta.shape[0]))
    if delta.size <= 256:
        for (i, j), v in np.ndenumerate(delta):
            ax.text(j, i, f"{v:+.2g}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax)
    return save(fig, path)


def plot_repeat(result, path):
    plt = pyplot()
    names = list(result["variants"])
    fig, axes = plt.subplots(2, len(names), figsize=(11, 7), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for col, variant in enumerate(names):
        layers = result["variants"][variant]
        labelled = set(range(0, len(layers), max(1, len(layers) // 6))) | {len(layers) - 1}  # a readable legend
        for e in layers:
            color = cmap(e["layer"] / max(1, len(layers) - 1))
            label = f"layer {e['layer']}" if e["layer"] in labelled else None
            axes[0, col].plot(e["resid_norm"], color=color, label=label)
            axes[1, col].plot(e["received"], color=color)
        axes[0, col].set(yscale="log", title=f"{variant}: residual norm per position", xlabel="position")
        axes[1, col].set(title=f"{variant}: attention received per key position", xlabel="key position")
    axes[0, 0].legend(fontsize=7)
    return save(fig, path)


def plot_compare(series, path):
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    panels = [("val_loss", "val loss", "linear"), ("max_top1", "largest |h| over layers (the massive entry)", "log"),
              ("max_ratio", "max top-1/median |h| over layers", "log"),
              ("grad_top1", "dLoss/dh at the largest |h| (signed: descent moves h against it)", "symlog"),
              ("first_mass", "mean attention mass on position 0", "linear"),
              ("slot_mass", "mean attention mass on the sink slot", "linear")]
    for ax, (key, title, scale) in zip(axes.ravel(), panels):
        for color, (name, s) in enumerate(series.items()):  # one colour per run in every panel
            points = [(i, v) for i, v in s[key] if v is not None]
            if points:
                ax.plot(*zip(*points), marker=".", color=plt.get_cmap("tab20")(color % 20), label=name)
        ax.set(title=title, xlabel="iter")
        if ax.lines:
            ax.set_yscale(scale, **({"linthresh": 1e-6} if scale == "symlog" else {}))
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data (tracking off, or no sink slot)", ha="center", va="center",
                    transform=ax.transAxes)
    return save(fig, path)


def plot_pushes(series, path):
    """The signed first moment and update of each tracked single weight over iterations, one line per run: which
    way the optimizer moves the weights that write the massive entry."""
    plt = pyplot()
    keys = sorted({k for s in series.values() for k in s["pushes"]})
    cols = sorted({k.split("/", 1)[1] for k in keys})
    fig, axes = plt.subplots(2, len(cols), figsize=(5.5 * len(cols), 7), squeeze=False)
    for col, weight in enumerate(cols):
        for row, kind in enumerate(("opt_m", "opt_update")):
            ax = axes[row, col]
            for color, (name, s) in enumerate(series.items()):
                points = s["pushes"].get(f"{kind}/{weight}")
                if points:
                    ax.plot(*zip(*points), marker=".", color=plt.get_cmap("tab20")(color % 20), label=name)
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set(title=f"{'first moment m' if kind == 'opt_m' else 'update'} of {weight}", xlabel="iter")
            ax.title.set_fontsize(8)
            if ax.lines[1:]:
                ax.legend(fontsize=6)
    return save(fig, path)


def plot_stream(rows, path, smooth=64):
    """Running loss over the streamed text (mean of the last `smooth` tokens), one line per (keep, window)."""
    import numpy as np
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for row in rows:
        losses = np.array(row["losses"], dtype=float)
        running = np.convolve(losses, np.ones(smooth) / smooth, mode="valid") if len(losses) >= smooth else losses
        ax.plot(np.arange(len(running)) + min(smooth, len(losses)), running,
                label=f"keep {row['keep']}, window {row['window']}: ppl {row['ppl']:.3g}")
    ax.set(xlabel="token", ylabel=f"loss (mean of the last {smooth} tokens)", title="streaming with a rolling cache")
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_explicit(result, path):
    """A model against its explicit-sink conversion: the largest |h| over real tokens in each block (log scale),
    with BOS's own in the original, and the repeated-token probe's largest |h| at each position."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = result["layers"]
    x = [e["layer"] for e in layers["original"]]
    left.plot(x, [e["max_abs"] for e in layers["original"]], marker="o", label="original, real tokens")
    left.plot(x, [e["max_abs"] for e in layers["converted"]], marker="s", label="converted (slot), real tokens")
    left.plot(x, [e["median"] for e in layers["converted"]], color="gray", label="converted, median")
    left.axhline(result["bos_max_abs"], color="red", linestyle="--", label="original, at BOS (largest)")
    left.set(yscale="log", xlabel="block", ylabel="largest |h|", title="massive activations on real tokens")
    left.set_xticks(x[::max(1, len(x) // 15)])
    left.legend(fontsize=8)
    repeat = result["repeat"]
    for key, label in (("original_no_bos", "original, no BOS"), ("original_bos_first", "original, BOS first"),
                       ("converted", "converted (slot)")):
        right.plot(range(len(repeat[key])), repeat[key], label=label)
    right.set(yscale="log", xlabel="position of the repeated token", ylabel="largest |h| over blocks",
              title=f"token {repeat['token']} repeated {repeat['n']} times")
    right.legend(fontsize=8)
    return save(fig, path)
