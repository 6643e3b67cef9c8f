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
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps a legend placed outside the axes
    pyplot().close(fig)
    return path


def layer_ticks(n_layers):
    """Every layer up to 16 layers, else every 2nd, 5th, ... so that the labels never run together."""
    step = next(s for s in (1, 2, 5, 10, 20, 50) if n_layers / s <= 16)
    return list(range(0, n_layers, step))


def run_colors(plt, n):
    """One colour per run: tab10's ten strong colours, tab20 past ten runs."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def figure_legend(fig, axes):
    """One legend for the whole figure, right of the axes: the runs share one colour in every panel."""
    labelled = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(list(labelled.values()), list(labelled), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, frameon=False)


def plot_activations(layers, path):
    """Sun et al.'s figure: top-1, top-2, top-3 and median |h| of each block output, log scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [e["layer"] for e in layers]
    for rank in range(min(3, len(layers[0]["top"]))):
        ax.plot(x, [e["top"][rank][0] for e in layers], marker="o", label=f"top {rank + 1}")
    ax.plot(x, [e["median"] for e in layers], marker="o", color="gray", label="median")
    ax.set(yscale="log", xlabel="layer (block output)", ylabel="|activation|", title="largest and median |h|",
           xticks=layer_ticks(len(x)))
    ax.legend()
    return save(fig, path)


def plot_activation_map(absmax, layer, path, positions=16):
    """max |h| over sequences at one block's output. Left, as Sun et al. draw it: |h| as 3-D bars over the first
    `positions` positions and every dim, so a massive entry towers over the rest. Right: every position x dim on
    a log colour scale, the largest entry ringed."""
    from matplotlib.colors import LogNorm
    from mpl_toolkits.mplot3d.art3d import Line3DCollection
    import numpy as np
    plt = pyplot()
    values = absmax.float().cpu().numpy()
    fig = plt.figure(figsize=(13, 4.6))
    bars = fig.add_subplot(1, 2, 1, projection="3d")
    shown = values[:positions]
    pos, dim = np.meshgrid(np.arange(shown.shape[0]), np.arange(shown.shape[1]), indexing="ij")
    stems = np.stack([np.stack([pos, dim, np.zeros_like(shown)], -1), np.stack([pos, dim, shown], -1)], -2)
    colors = plt.get_cmap("viridis")(shown / max(float(shown.max()), 1e-12))
    bars.add_collection3d(Line3DCollection(stems.reshape(-1, 2, 3), colors=colors.reshape(-1, 4), linewidths=1.2))
    bars.set(xlim=(0, shown.shape[0] - 1), ylim=(0, shown.shape[1] - 1), zlim=(0, float(shown.max()) * 1.05),
             xlabel="position", ylabel="dim", zlabel="|h|", title=f"block {layer}: |h| at the first {shown.shape[0]} "
                                                                   "positions")
    bars.zaxis.labelpad = 10
    bars.view_init(elev=22, azim=-60)
    top_pos, top_dim = divmod(int(shown.argmax()), shown.shape[1])
    bars.text(top_pos, top_dim, float(shown.max()) * 1.02, f"{shown.max():.4g} (pos {top_pos}, dim {top_dim})",
              color="red", fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    floor = max(float(values[values > 0].min()) if (values > 0).any() else 1e-6, float(values.max()) * 1e-6)
    image = ax.imshow(values.clip(min=floor), aspect="auto", interpolation="nearest", cmap="viridis",
                      norm=LogNorm(vmin=floor, vmax=max(float(values.max()), floor * 10)))
    fig.colorbar(image, ax=ax, label="max |h| over sequences (log scale)")
    top_pos, top_dim = divmod(int(values.argmax()), values.shape[1])
    ax.scatter([top_dim], [top_pos], s=160, facecolors="none", edgecolors="red", linewidths=1.5)
    ax.set(xlabel="dim", ylabel="position", title=f"block {layer}, every position (largest ringed)")
    return save(fig, path)


def heatmap(ax, values, title, vmax=1.0):
    """Layer x head heatmap with the numbers written in when the grid is small enough to read."""
    import numpy as np
    values = np.array(values, dtype=float)
    image = ax.imshow(values, vmin=0.0, vmax=vmax, cmap="magma", aspect="auto")
    ax.set(xlabel="head", ylabel="layer", title=title, xticks=range(values.shape[1]),
           yticks=layer_ticks(values.shape[0]))
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
    n_layers = len(result["variants"][names[0]])
    for col, variant in enumerate(names):
        for e in result["variants"][variant]:
            color = cmap(e["layer"] / max(1, n_layers - 1))
            axes[0, col].plot(e["resid_norm"], color=color)
            axes[1, col].plot(e["received"], color=color)
        axes[0, col].set(yscale="log", title=f"{variant}: residual norm per position", xlabel="position")
        axes[1, col].set(title=f"{variant}: attention received per key position", xlabel="key position")
    fig.tight_layout()
    layers = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(1, n_layers - 1)))
    fig.colorbar(layers, ax=axes.ravel().tolist(), label="layer", ticks=layer_ticks(n_layers))  # one key, no legend
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


COMPARE_PANELS = [("val_loss", "val loss", "linear"),
                  ("max_top1", "largest |h| over layers (the massive entry)", "log"),
                  ("max_ratio", "max top-1/median |h| over layers", "log"),
                  ("grad_top1", "dLoss/dh at the largest |h| (signed: descent moves h against it)", "symlog"),
                  ("first_mass", "mean attention mass on position 0", "linear"),
                  ("slot_mass", "mean attention mass on the sink slot", "linear")]


def plot_compare(series, path):
    """One panel per series key (a compare.json written before a key existed has fewer), one legend."""
    plt = pyplot()
    panels = [p for p in COMPARE_PANELS if any(p[0] in s for s in series.values())]
    cols = 3 if len(panels) > 4 else 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(5.3 * cols, 7), squeeze=False)
    colors = run_colors(plt, len(series))
    for ax, (key, title, scale) in zip(axes.ravel(), panels):
        for color, (name, s) in zip(colors, series.items()):  # one colour per run in every panel
            points = [(i, v) for i, v in s.get(key, []) if v is not None]
            if points:
                ax.plot(*zip(*points), marker=".", color=color, label=name)
        ax.set(title=title, xlabel="iter")
        if ax.lines:
            ax.set_yscale(scale, **({"linthresh": 1e-6} if scale == "symlog" else {}))
        else:
            ax.text(0.5, 0.5, "no data (tracking off, or no sink slot)", ha="center", va="center",
                    transform=ax.transAxes)
    figure_legend(fig, axes.ravel())
    return save(fig, path)


def plot_pushes(series, path):
    """The signed first moment and update of each tracked single weight over iterations, one line per run: which
    way the optimizer moves the weights that write the massive entry."""
    plt = pyplot()
    keys = sorted({k for s in series.values() for k in s["pushes"]})
    cols = sorted({k.split("/", 1)[1] for k in keys})
    fig, axes = plt.subplots(2, len(cols), figsize=(5.5 * len(cols), 7), squeeze=False)
    colors = run_colors(plt, len(series))
    for col, weight in enumerate(cols):
        for row, kind in enumerate(("opt_m", "opt_update")):
            ax = axes[row, col]
            for color, (name, s) in zip(colors, series.items()):
                points = s["pushes"].get(f"{kind}/{weight}")
                if points:
                    ax.plot(*zip(*points), marker=".", color=color, label=name)
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set(title=f"{'first moment m' if kind == 'opt_m' else 'update'} of {weight}", xlabel="iter")
            ax.title.set_fontsize(8)
    figure_legend(fig, axes.ravel())
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
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)  # beside, never over, the curves
    return save(fig, path)


def plot_explicit(result, path):
    """A model against its explicit-sink conversion: the largest |h| over real tokens in each block (log scale),
    with BOS's own in the original, and the repeated-token probe's largest |h| at each position."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = result["layers"]
    x = [e["layer"] for e in layers["original"]]
    left.plot(x, result["bos_max_abs_by_layer"], color="red", marker="^", label="original, at BOS")
    left.plot(x, [e["max_abs"] for e in layers["original"]], marker="o", markersize=8, label="original, real tokens")
    left.plot(x, [e["max_abs"] for e in layers["converted"]], marker="s", markersize=4, linestyle="--",
              label="converted (slot), real tokens: the same")
    left.plot(x, [e["median"] for e in layers["converted"]], color="gray", label="converted, median")
    left.set(yscale="log", xlabel="block", ylabel="largest |h|", title="massive activations on real tokens")
    left.set_xticks(x[::max(1, len(x) // 15)])
    left.legend(fontsize=8)
    repeat = result["repeat"]
    for key, label, style in (("original_no_bos", "original, no BOS", "-"),
                              ("original_bos_first", "original, BOS first (BOS not shown)", "-"),
                              ("converted", "converted (slot), no BOS", "--")):
        right.plot(range(len(repeat[key])), repeat[key], style, label=label)
    right.set(yscale="log", xlabel="position of the repeated token", ylabel="largest |h| over blocks",
              title=f"token {repeat['token']} repeated {repeat['n']} times")
    right.legend(fontsize=8)
    return save(fig, path)


def plot_trajectory(rows, path):
    """A massive activation over training, one panel each: the massive entry's |h| and its top-1/median ratio,
    each with Sun et al.'s threshold (log scale, the points that meet their criterion starred), the sink rate, and
    the loss change when the entry is zeroed or set to its mean. The x axis is the training step (symlog when the
    steps span orders of magnitude, as Pythia's revisions do), or the point's index when a step is unknown."""
    plt = pyplot()
    steps = [r["step"] for r in rows]
    known = None not in steps
    x = steps if known else list(range(len(rows)))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    hits = [i for i, r in enumerate(rows) if r["sun_hits"]]
    for ax, key, threshold, label in ((axes[0, 0], "value", 100.0, "|h| of the massive entry"),
                                      (axes[0, 1], "ratio", 1000.0, "its top-1 / median ratio")):
        values = [r[key] for r in rows]
        ax.plot(x, values, marker="o", color="C0")
        ax.axhline(threshold, color="gray", lw=0.8, ls=":", label=f"Sun et al.: {threshold:g}")
        if hits:
            ax.plot([x[i] for i in hits], [values[i] for i in hits], "k*", markersize=11, label="Sun et al. hits")
        ax.set(yscale="log", title=label)
        ax.legend(fontsize=8)
    axes[1, 0].plot(x, [r["sink_rate"] for r in rows], marker="o", color="C2")
    axes[1, 0].set(ylabel="% of (layer, head) pairs", title="sink rate (alpha on position 0 > 0.3)", ylim=(-3, 103))
    axes[1, 1].plot(x, [r["delta_zero"] for r in rows], marker="o", color="C3", label="zeroed")
    axes[1, 1].plot(x, [r["delta_mean"] for r in rows], marker=".", color="gray", ls="--", label="set to its mean")
    axes[1, 1].axhline(0.0, color="gray", lw=0.5)
    axes[1, 1].set(ylabel="loss change (nats)", title="ablating the massive entry")
    axes[1, 1].legend(fontsize=8)
    positive = [s for s in steps if s] if known else []
    spread = bool(positive) and max(positive) > 100 * min(positive)
    for ax in axes.ravel():
        ax.set_xlabel("training step" if known else "point")
        if spread:
            ax.set_xscale("symlog", linthresh=1)
    return save(fig, path)


def plot_patch_map(result, path, labels=None):
    """Activation patching's recovery, layer x head or layer x position: 1 (red) where patching the site alone
    restores the clean run's metric, 0 (white) where it does nothing, blue where it moves the metric the other way.
    `labels`: the corrupt prompt's tokens for a position map."""
    import numpy as np
    plt = pyplot()
    values = np.array([[np.nan if v is None else v for v in row] for row in result["recovery"]], dtype=float)
    limit = max(1.0, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.28 * values.shape[1] + 2.5), max(4.0, 0.22 * values.shape[0] + 1.5)))
    image = ax.imshow(values, vmin=-limit, vmax=limit, cmap="RdBu_r", aspect="auto", interpolation="nearest")
    columns = range(values.shape[1])
    ax.set(xlabel=result["columns"], ylabel="layer", yticks=layer_ticks(values.shape[0]), xticks=list(columns),
           title=f"recovery of {result['metric']}\npatching {result['point']} (clean {result['clean']:.4g}, "
                 f"corrupt {result['corrupt']:.4g})")
    ax.title.set_fontsize(9)
    if labels is not None and result["columns"] == "position":
        ax.set_xticklabels([repr(t)[1:-1] for t in labels], rotation=90, fontsize=6)
    if values.size <= 300:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * limit else "black")
    fig.colorbar(image, ax=ax, label="(patched - corrupt) / (clean - corrupt)")
    return save(fig, path)
