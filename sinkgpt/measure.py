"""
Running a model over probe batches with scoped hooks and collecting per-layer statistics: the one pass that the
analysis report, the interventions, the training-time tracker, the study and the tests share.

    stats = collect(model, [(x, y)], trigger_masks=None, k=3, patches={"h.1.resid_post": entry_patch(...)})

Hooks are registered with model.hooks(...) and removed on exit, so the model runs hook-free (and on its fast
path) again afterwards.

May import: sinkgpt.common, sinkgpt.stats.
"""

import torch

from sinkgpt.common import InputError
from sinkgpt.stats import (bb_masses, excess_kurtosis, finite_max, first_token_mass, mean_of, moment_sums, position_norms,
                           rate_from_alphas, safe_ratio, sequence_medians, sequence_ratios, sink_alpha, slot_mass,
                           top_entries, value_norms)


class AnalyzeError(InputError):
    """Bad input to an analysis (target, data, arguments, hook names)."""


def capture(model, idx, names, targets=None, reduce=None, patches=None):
    """One forward of model(idx, targets) under no_grad with read hooks at `names`: returns ({name: tensor},
    loss or None). reduce(name, tensor) may shrink what is kept (patterns are T x T per head). patches maps
    hook names to functions that return a replacement tensor; a read at the same name sees the patched one.
    The hooks live for this one forward pass."""
    captured = {}

    def hook_for(name):
        patch = (patches or {}).get(name)
        read = name in names

        def fn(x):
            out = patch(x) if patch else None
            if read:
                seen = x if out is None else out
                captured[name] = reduce(name, seen) if reduce else seen.detach()
            return out
        return fn

    try:
        with torch.no_grad(), model.hooks({name: hook_for(name) for name in set(names) | set(patches or {})}):
            _, loss = model(idx, targets)
    except KeyError as e:
        raise AnalyzeError(e.args[0]) from None
    return captured, None if loss is None else loss.item()


def residual_grads(model, idx, targets):
    """Gradients of the loss with respect to every block output (resid_post), [(B, P, C)] per layer, through
    torch.autograd.grad: parameter .grad stays untouched (the training step owns it)."""
    resids = {}
    n_layer = model.config.n_layer
    reads = {f"h.{layer}.resid_post": (lambda x, layer=layer: resids.__setitem__(layer, x)) for layer in range(n_layer)}
    with torch.enable_grad():
        with model.hooks(reads):
            _, loss = model(idx, targets)
        tensors = [resids[layer] for layer in range(n_layer)]
        if not all(t.requires_grad for t in tensors):  # frozen model: no gradient to measure
            return None
        return torch.autograd.grad(loss, tensors)


def layer_reducer(model, trigger_mask=None):
    """reduce() for capture: keeps, per layer, only what the statistics need (no T x T patterns)."""
    n_prefix, n_slot = model.n_prefix, model.n_slot_columns
    blocks = model.transformer.h

    def reduce(name, x):
        layer, point = int(name.split(".")[1]), name.split(".")[2]
        if point == "resid_post":
            x = x.detach().float()
            absmax, holder = x.abs().max(0)  # holder: the sequence of the batch that holds each entry's max
            return {"absmax": absmax, "holder": holder, "medians": sequence_medians(x[:, n_prefix:]),
                    "ratios": sequence_ratios(x[:, n_prefix:]),
                    "norms": position_norms(x, n_prefix), "moments": moment_sums(x[:, n_prefix:])}
        if point == "attn_z":  # the attention output before c_proj: Bondarenko et al.'s outliers
            x = x.detach().float()[:, n_prefix:]
            return {"max_abs": x.abs().amax(), "moments": moment_sums(x)}
        if point == "pattern":
            x = x.detach().float()
            out = {"first": first_token_mass(x, n_slot), "slot": slot_mass(x, n_slot),
                   "alpha_first": sink_alpha(x, n_slot, "first"),
                   "alpha_slot": sink_alpha(x, n_slot, "slot") if n_slot else None}
            if trigger_mask is not None:
                out["bb"] = bb_masses(x, trigger_mask, n_slot, model.config.window_of(layer))
            return out
        if point == "v":  # (B, n_kv_head, P, D): each key/value head serves a group of query heads
            v = x.detach().float().repeat_interleave(model.config.n_head // x.size(1), dim=1)
            return value_norms(v, blocks[layer].attn.c_proj.weight.detach().float(), n_prefix)
        return x.detach()
    return reduce


def collect(model, batches, trigger_masks=None, k=3, patches=None):
    """Every layer's statistics over the probe batches [(x, y)]: the one pass that the report, the
    interventions, the training tracker and the tests share. trigger_masks (one (B, T) bool per batch) adds
    the Bigram-Backcopy metrics. Returns plain values, plus 'maps' (per layer (T, C) max |h| over sequences,
    real positions) for plots and massive-activation search."""
    cfg = model.config
    n_prefix, n_slot = model.n_prefix, model.n_slot_columns
    bb = trigger_masks is not None
    points = ("resid_post", "pattern", "attn_z") + (("v",) if bb else ())
    names = [f"h.{layer}.{point}" for layer in range(cfg.n_layer) for point in points]
    runs, losses = [], []
    for i, (x, y) in enumerate(batches):
        got, loss = capture(model, x, names, y, layer_reducer(model, trigger_masks[i] if bb else None), patches)
        runs.append(got)
        losses.append(loss)
    layers, maps, medians, alphas_first, alphas_slot = [], [], [], [], []
    for layer in range(cfg.n_layer):
        resid = [run[f"h.{layer}.resid_post"] for run in runs]
        attn = [run[f"h.{layer}.pattern"] for run in runs]
        attn_z = [run[f"h.{layer}.attn_z"] for run in runs]
        absmax, holder_batch = torch.stack([r["absmax"] for r in resid]).max(0)
        median = torch.cat([r["medians"] for r in resid]).mean().item()
        pos0_norm, other_norm = torch.stack([r["norms"] for r in resid]).mean(0).tolist()
        top = top_entries(absmax[n_prefix:], k)
        top_tokens = []  # the input token at each top entry, in the sequence that holds it
        for _, pos, dim in top:
            b = holder_batch[n_prefix + pos, dim].item()
            top_tokens.append(batches[b][0][resid[b]["holder"][n_prefix + pos, dim].item(), pos].item())
        first, slot = mean_of([a["first"] for a in attn]), mean_of([a["slot"] for a in attn])
        alphas_first.append(torch.cat([a["alpha_first"] for a in attn]))
        if n_slot:
            alphas_slot.append(torch.cat([a["alpha_slot"] for a in attn]))
        entry = {
            # the median: the mean of the sequences' medians; the ratio: the largest of the sequences' own ratios
            "layer": layer, "top": top, "top_tokens": top_tokens, "median": median, "ratio": torch.cat([r["ratios"] for r in resid]).max().item(),
            "pos0_norm": pos0_norm, "other_norm": other_norm, "pos0_norm_ratio": safe_ratio(pos0_norm, other_norm),
            # a dedicated sink token growing a massive activation is itself interesting: reported apart
            "sink_token_top": top_entries(absmax[:n_prefix], k, offset=-n_prefix) if n_prefix else None,
            "first_token_mass": first.tolist(), "first_token_mass_mean": first.mean().item(),
            "slot_mass": None if slot is None else slot.tolist(),
            "slot_mass_mean": None if slot is None else slot.mean().item(),
            # outliers (Bondarenko et al.): max |x| and excess kurtosis over every entry, all probe sequences
            "resid_kurtosis": excess_kurtosis(sum(r["moments"] for r in resid)),
            "attn_max_abs": torch.stack([a["max_abs"] for a in attn_z]).amax().item(),
            "attn_kurtosis": excess_kurtosis(sum(a["moments"] for a in attn_z)),
            "alpha_first": alphas_first[-1].mean(0).tolist(),
            "alpha_slot": alphas_slot[-1].mean(0).tolist() if n_slot else None,
        }
        if bb:
            entry["bb"] = bb_layer(attn, [run[f"h.{layer}.v"] for run in runs], pos0_norm, other_norm)
        layers.append(entry)
        maps.append(absmax[n_prefix:])
        medians.append(median)
    return {"layers": layers, "loss": sum(losses) / len(losses) if None not in losses else None,
            "sink_rate": rate_from_alphas(alphas_first), "slot_sink_rate": rate_from_alphas(alphas_slot) if n_slot
            else None, "n_sequences": sum(x.size(0) for x, _ in batches), "seq_len": batches[0][0].size(1),
            "outliers": worst_outliers(layers), "maps": maps, "medians": medians}


def worst_outliers(layers):
    """The largest of each outlier figure over the layers (block output: max |h| is the top-1 entry)."""
    return {"resid_max_abs": finite_max([e["top"][0][0] for e in layers]),
            "resid_kurtosis": finite_max([e["resid_kurtosis"] for e in layers]),
            "attn_max_abs": finite_max([e["attn_max_abs"] for e in layers]),
            "attn_kurtosis": finite_max([e["attn_kurtosis"] for e in layers])}


def bb_layer(attn, values, resid_bos, resid_other):
    """One layer's Bigram-Backcopy metrics, averaged over the batches (per head lists)."""
    masses = {key: mean_of([a["bb"][key] for a in attn]) for key in attn[0]["bb"]}
    value_bos, value_other = mean_of([v[0] for v in values]), mean_of([v[1] for v in values])
    out = {key: None if m is None else m.tolist() for key, m in masses.items()}
    out.update(value_bos=value_bos.tolist(), value_other=value_other.tolist(),
               value_ratio=(value_bos / value_other).tolist(), resid_bos=resid_bos, resid_other=resid_other,
               resid_ratio=safe_ratio(resid_bos, resid_other))
    return out


def entry_patch(entries, op="set"):
    """A hook that sets, adds to or scales entries [(index, dim, value)] of a (B, positions, C) tensor."""
    def patch(x):
        x = x.clone()
        for index, dim, value in entries:
            if op == "set":
                x[:, index, dim] = value
            elif op == "add":
                x[:, index, dim] += value
            else:
                x[:, index, dim] *= value
        return x
    return patch
