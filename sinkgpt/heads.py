"""
Which heads build the sink: head ablation (zero, or the mean over the probe sequences) and activation patching
(Meng et al. 2022's causal tracing with clean activations restored; Wang et al. 2023; Heimersheim & Nanda 2024,
"How to use and interpret activation patching").

    result = patch_map(model, clean_ids, corrupt_ids, "heads", Metric("entry", layer=11, positions=None, dim=507),
                       align=1)

A site is one head's output (hook point z, every position), or one position of a layer's residual stream (resid_pre),
attention output (attn_out) or MLP output (mlp_out). Each site's activation from the clean run replaces the corrupt
run's, one site at a time, and the metric's recovery (patched - corrupt) / (clean - corrupt) fills a (layer x head)
or (layer x position) map: 1 where the site alone carries the difference, 0 where it carries none. The corrupt run
is copied once per site in one batch, each copy with its own site patched.

Prompts of different lengths (a BOS-first clean prompt against the same text without BOS) are paired by `align`:
clean position i + align stands for corrupt position i (clean positions before `align` are never patched in).

May import: sinkgpt.common, sinkgpt.measure.
"""

from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from sinkgpt.measure import AnalyzeError, capture

SITE_POINTS = {"heads": "z", "resid": "resid_pre", "attn": "attn_out", "mlp": "mlp_out"}
METRICS = ("loss", "logit_diff", "entry", "neuron")
READ_POINTS = {"entry": "resid_post", "neuron": "mlp_post"}  # where an activation metric reads


class StopForward(Exception):
    """Raised by the hook that has read what the metric needs: the layers after it are never computed."""


@dataclass
class Metric:
    """loss: the mean next-token loss over the prompt, of `targets` (1, T - 1) when given (patch_map: the clean
    prompt's, so that recovery 1 is the clean run's loss), else of the run's own next tokens; logit_diff:
    logit[good] - logit[bad] at the last position; entry: block `layer`'s output at `dim`; neuron: MLP neuron
    `dim` of block `layer` (its activation, mlp_post); both at `positions` (corrupt positions; None = every one),
    their mean."""
    kind: str
    targets: torch.Tensor = None
    good: int = 0
    bad: int = 0
    layer: int = 0
    positions: tuple = None
    dim: int = 0

    @property
    def reads_activation(self):
        return self.kind in READ_POINTS

    def name(self):
        if self.reads_activation:
            where = "all" if self.positions is None else f"{self.positions[0]}" + (
                f"-{self.positions[-1]}" if len(self.positions) > 1 else "")
            return f"{self.kind} h.{self.layer}.{READ_POINTS[self.kind]}[pos {where}, {self.kind_dim} {self.dim}]"
        return f"logit[{self.good}] - logit[{self.bad}]" if self.kind == "logit_diff" else "loss"

    @property
    def kind_dim(self):
        return "neuron" if self.kind == "neuron" else "dim"


# ----------------------------------------------------------------------------------------------------
# parsing and checks


def parse_heads(text, config, flag="--heads"):
    """'L.H,L.H' -> [(layer, head)], every one inside the model."""
    heads = []
    for item in text.split(","):
        try:
            layer, head = (int(part) for part in item.split("."))
        except ValueError:
            raise AnalyzeError(f"{flag} {item!r} is not LAYER.HEAD") from None
        if not 0 <= layer < config.n_layer:
            raise AnalyzeError(f"{flag} {item}: layer {layer} is outside the model's layers 0-{config.n_layer - 1}")
        if not 0 <= head < config.n_head:
            raise AnalyzeError(f"{flag} {item}: head {head} is outside the model's heads 0-{config.n_head - 1}")
        heads.append((layer, head))
    return heads


def parse_positions(text, length, flag="--entry"):
    """'all' -> None, 'P' or 'A-B' (inclusive) -> a tuple of positions inside a prompt of `length` tokens."""
    if text == "all":
        return None
    try:
        first, _, last = text.partition("-")
        positions = tuple(range(int(first), int(last or first) + 1))
    except ValueError:
        raise AnalyzeError(f"{flag} position {text!r} is not P, A-B or all") from None
    if not positions:
        raise AnalyzeError(f"{flag} position {text} is an empty range (A-B needs A <= B)")
    if positions[0] < 0 or positions[-1] >= length:
        raise AnalyzeError(f"{flag} position {text} is outside the corrupt prompt's positions 0-{length - 1}")
    return positions


def activation_metric(kind, text, config, length):
    """'LAYER:POS:DIM' (POS: P, A-B or all, corrupt positions; DIM a residual dim, or an MLP neuron for
    kind='neuron') -> a Metric inside the model."""
    flag = f"--{kind}"
    parts = text.split(":")
    try:
        layer, dim = int(parts[0]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise AnalyzeError(f"{flag} {text!r} is not LAYER:POS:{'NEURON' if kind == 'neuron' else 'DIM'}") from None
    if not 0 <= layer < config.n_layer:
        raise AnalyzeError(f"{flag} {text}: layer {layer} is outside the model's layers 0-{config.n_layer - 1}")
    width, what = (config.hidden_size, "MLP neurons") if kind == "neuron" else (config.n_embd, "width")
    if not 0 <= dim < width:
        raise AnalyzeError(f"{flag} {text}: {dim} is outside the model's {what} 0-{width - 1}")
    return Metric(kind, layer=layer, positions=parse_positions(parts[1], length, flag), dim=dim)


def check_alignment(clean_len, corrupt_len, align):
    if align < 0 or clean_len - align != corrupt_len:
        hint = (f"; give --align {clean_len - corrupt_len} to pair clean position i+{clean_len - corrupt_len} with "
                "corrupt position i (a prompt with BOS against the same one without)" if clean_len > corrupt_len
                else "; give prompts of equal length")
        raise AnalyzeError(f"the clean prompt has {clean_len} tokens and the corrupt one {corrupt_len}: patching needs "
                           f"position-aligned prompts (clean length = corrupt length + --align, now {align})" + hint)


# ----------------------------------------------------------------------------------------------------
# the metric on a batch of runs


def metric_values(model, ids, metric, patches=None, offset=0):
    """The metric of each row of ids (N, T) under `patches` ({hook name: fn}); `offset` leading positions are
    left out (the clean run's unaligned start)."""
    if metric.reads_activation:
        profile = activation_profile(model, ids, metric, patches, offset)
        return (profile if metric.positions is None else profile[:, list(metric.positions)]).mean(1)
    with torch.no_grad(), model.hooks(patches or {}):
        logits, _ = model(ids, last_only=metric.kind == "logit_diff")
    if metric.kind == "logit_diff":
        last = logits[:, -1].double()
        return last[:, metric.good] - last[:, metric.bad]
    logits = logits[:, offset:-1]  # in the model's dtype: (N, T, vocab) in float64 would be GBs for a real model
    targets = (ids[:, offset + 1:] if metric.targets is None else metric.targets).expand(len(ids), -1)
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    logits = logits.reshape(-1, logits.size(-1))
    losses = F.cross_entropy(logits.float() if low_precision else logits, targets.reshape(-1), reduction="none")
    return losses.view(len(ids), -1).double().mean(1)


def activation_profile(model, ids, metric, patches=None, offset=0):
    """An activation metric's value at every position (N, T - offset): the forward pass stops after its layer."""
    name, seen = f"h.{metric.layer}.{READ_POINTS[metric.kind]}", {}

    def read_and_stop(x):
        seen["x"] = x
        raise StopForward

    with torch.no_grad(), model.hooks({**(patches or {}), name: read_and_stop}):
        try:
            model(ids)
        except StopForward:
            pass
    return seen["x"][:, model.n_prefix + offset:, metric.dim].double()


# ----------------------------------------------------------------------------------------------------
# activation patching


def site_list(model, kind, length, metric):
    """[(layer, index)]: heads (index = head) or positions (index = corrupt position). Layers after an
    activation metric's layer cannot move it and are left out (a neuron metric keeps its layer's heads)."""
    layers = range(metric.layer + 1 if metric.reads_activation else model.config.n_layer)
    width = model.config.n_head if kind == "heads" else length
    return [(layer, index) for layer in layers for index in range(width)]


def clean_sources(model, clean_ids, kind, align):
    """{layer: the clean run's tensor at the site's hook point, batch dim dropped, positions aligned to the
    corrupt prompt's (the sink-token prefix kept)}."""
    names = [f"h.{layer}.{SITE_POINTS[kind]}" for layer in range(model.config.n_layer)]
    got, _ = capture(model, clean_ids, names)
    n = model.n_prefix
    return {layer: torch.cat([got[name][0, :n], got[name][0, n + align:]]) for layer, name in enumerate(names)}


def site_patches(model, kind, placed, sources):
    """{hook name: fn} that writes each site's clean activation into its row: placed = [(row, layer, index)]."""
    by_layer = {}
    for row, layer, index in placed:
        by_layer.setdefault(layer, ([], []))
        by_layer[layer][0].append(row)
        by_layer[layer][1].append(index + (0 if kind == "heads" else model.n_prefix))
    patches = {}
    for layer, (rows, indices) in by_layer.items():
        source = sources[layer]
        rows, indices = torch.tensor(rows, device=source.device), torch.tensor(indices, device=source.device)

        def patch(x, rows=rows, indices=indices, source=source):
            x = x.clone()
            if kind == "heads":  # x (N, P, H, D): row r gets head h's output at every position
                x[rows, :, indices] = source[:, indices].transpose(0, 1).to(x.dtype)
            else:  # x (N, P, C): row r gets position p
                x[rows, indices] = source[indices].to(x.dtype)
            return x
        patches[f"h.{layer}.{SITE_POINTS[kind]}"] = patch
    return patches


def patched_values(model, clean_ids, corrupt_ids, kind, sites, metric, align=0, batch_size=32, one_run=False):
    """The metric of the corrupt run with the clean activation at each site: one value per site (each site in its
    own copy, batch_size copies per forward pass), or with one_run one value with every site patched at once."""
    sources = clean_sources(model, clean_ids, kind, align)
    if one_run:
        return metric_values(model, corrupt_ids, metric, site_patches(model, kind, [(0, l, i) for l, i in sites],
                                                                      sources))
    values = []
    for start in range(0, len(sites), batch_size):
        chunk = sites[start:start + batch_size]
        placed = [(row, layer, index) for row, (layer, index) in enumerate(chunk)]
        ids = corrupt_ids.expand(len(chunk), -1)
        values.append(metric_values(model, ids, metric, site_patches(model, kind, placed, sources)))
    return torch.cat(values)


def clean_and_corrupt(model, clean_ids, corrupt_ids, metric, align):
    """(the metric for this pair of prompts, its value on the clean run, on the corrupt run), once the prompts
    are checked to be position-aligned. The loss metric scores the clean prompt's tokens in both runs, so that
    recovery 1 is the clean run's loss."""
    check_alignment(clean_ids.size(1), corrupt_ids.size(1), align)
    if metric.kind == "loss":
        metric = replace(metric, targets=clean_ids[:, align + 1:])
    return (metric, metric_values(model, clean_ids, metric, offset=align).item(),
            metric_values(model, corrupt_ids, metric).item())


def patch_map(model, clean_ids, corrupt_ids, kind, metric, align=0, batch_size=32):
    """Patch every site of `kind` from the clean into the corrupt run, one at a time: the metric's value for
    both runs and each patched one, and the recovery map (layer x head or layer x position; None where clean and
    corrupt agree and recovery is undefined). An activation metric's map stops at its layer (later layers cannot
    move it)."""
    if kind not in SITE_POINTS:
        raise AnalyzeError(f"--sites {kind!r} is not one of {', '.join(SITE_POINTS)}")
    metric, clean, corrupt = clean_and_corrupt(model, clean_ids, corrupt_ids, metric, align)
    sites = site_list(model, kind, corrupt_ids.size(1), metric)
    patched = patched_values(model, clean_ids, corrupt_ids, kind, sites, metric, align, batch_size)
    width = model.config.n_head if kind == "heads" else corrupt_ids.size(1)
    patched = patched.view(-1, width).tolist()  # (layers run, width)
    recovery = [[(v - corrupt) / (clean - corrupt) if clean != corrupt else None for v in row] for row in patched]
    return {"sites": kind, "point": SITE_POINTS[kind], "metric": metric.name(), "align": align,
            "clean": clean, "corrupt": corrupt, "patched": patched, "recovery": recovery,
            "columns": "head" if kind == "heads" else "position"}


def patch_heads_together(model, clean_ids, corrupt_ids, heads, metric, align=0):
    """Heads [(layer, head)] patched from the clean run into the corrupt run all at once: the metric on the
    clean, the corrupt and the patched run, the recovery, and for an activation metric its value at every
    (corrupt) position in each run."""
    metric, clean, corrupt = clean_and_corrupt(model, clean_ids, corrupt_ids, metric, align)
    sources = clean_sources(model, clean_ids, "heads", align)
    patches = site_patches(model, "heads", [(0, layer, head) for layer, head in heads], sources)
    values = {"clean": clean, "corrupt": corrupt, "patched": metric_values(model, corrupt_ids, metric, patches).item()}
    spread = values["clean"] - values["corrupt"]
    result = {"heads": [f"{layer}.{head}" for layer, head in heads], "metric": metric.name(), "align": align,
              **values, "recovery": (values["patched"] - values["corrupt"]) / spread if spread else None}
    if metric.reads_activation:
        result["profile"] = {"clean": activation_profile(model, clean_ids, metric, offset=align)[0].tolist(),
                             "corrupt": activation_profile(model, corrupt_ids, metric)[0].tolist(),
                             "patched": activation_profile(model, corrupt_ids, metric, patches)[0].tolist()}
    return result


def patch_markdown(result, labels=None):
    """The recovery map as a markdown table: one row per layer, one column per head or corrupt position."""
    width = len(result["recovery"][0])
    names = [f"{i} `{labels[i]!r}`" if labels else str(i) for i in range(width)] if result["columns"] == "position" \
        else [f"head {i}" for i in range(width)]
    lines = [f"Recovery of {result['metric']} patching {result['point']} from the clean run into the corrupt one "
             f"(clean {result['clean']:.6g}, corrupt {result['corrupt']:.6g}, align {result['align']}):", "",
             "| layer | " + " | ".join(names) + " |", "|---" * (width + 1) + "|"]
    for layer, row in enumerate(result["recovery"]):
        lines.append(f"| {layer} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# head ablation


def ablate_heads(model, batches, heads, entries):
    """Zero or mean ablation of heads [(layer, head)] (their output z, every position; mean: over the probe
    sequences at each position) and the loss and block-output entries [(layer, position index, dim)] (the mean
    over the sequences) with none, zero and mean ablation."""
    layers = sorted({layer for layer, _ in heads})
    names = [f"h.{layer}.z" for layer in layers]
    seen = [capture(model, x, names)[0] for x, _ in batches]
    means = {layer: torch.cat([s[f"h.{layer}.z"] for s in seen]).mean(0) for layer in layers}  # (P, H, D)
    entry_names = sorted({f"h.{layer}.resid_post" for layer, _, _ in entries})
    result = {"heads": [f"{layer}.{head}" for layer, head in heads]}
    for mode in ("none", "zero", "mean"):
        patches = {} if mode == "none" else {f"h.{layer}.z": head_ablation(
            [h for l, h in heads if l == layer], None if mode == "zero" else means[layer]) for layer in layers}
        runs = [capture(model, x, entry_names, y, patches=patches) for x, y in batches]
        result[f"loss_{mode}"] = sum(loss for _, loss in runs) / len(runs)
        result[f"entries_{mode}"] = [torch.cat([got[f"h.{layer}.resid_post"][:, index, dim] for got, _ in runs])
                                     .double().mean().item() for layer, index, dim in entries]
    result["delta_zero"] = result["loss_zero"] - result["loss_none"]
    result["delta_mean"] = result["loss_mean"] - result["loss_none"]
    return result


def head_ablation(heads, mean=None):
    """A hook on z (B, P, H, D) that sets the heads' outputs to zero, or to `mean` (P, H, D)."""
    def patch(x):
        x = x.clone()
        x[:, :, heads] = 0.0 if mean is None else mean[:, heads].to(x.dtype)
        return x
    return patch
