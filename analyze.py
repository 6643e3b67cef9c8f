"""
Find, plot and intervene on massive activations and attention sinks, and track them while training.
Every metric is defined in docs/sinks.md; the interventions follow L. Dial's GPT-2 bos_token study (2025),
Sun et al. (2024, massive activations), Yona et al. (2025, repeated tokens) and Guo et al. (2024, Bigram-Backcopy).

    python analyze.py out-shakespeare-char --report reports/char        # report.json, report.md and PNGs
    python analyze.py path/to/gpt2 --text FILE:prompt.txt --report reports/gpt2
    python analyze.py intervene out-bb/base --layer 1 --pos 0 --dim 17 --scale 0.5   # loss and sink masses move
    python analyze.py ablate out-bb/base                                 # zero vs mean ablation, val loss
    python analyze.py repeat out-bb/base --string a --n 64               # one token repeated, with/without BOS
    python analyze.py attribute out-bb/base --pos 0 --dim 17             # which MLP neurons write the entry
    python analyze.py compare out-a out-b --report reports/ab            # metrics.jsonl of runs, overlaid

TARGET is a training out_dir (reads its ckpt.pt), a checkpoint file, or a GPT-2 directory (config.json and
model.safetensors). Data: --data DATASET (its val split), --text "..." or --text FILE:path, default the
target's own dataset. train.py builds a TrainingTracker only when track_interval > 0: with tracking off
this file is never imported and training runs hook-free.
"""

import argparse
import json
import math
import os
import sys

import torch

from model import GPT

SINK_EPS, SINK_T = 0.3, 64  # Gu et al.: a head sinks when alpha > 0.3, measured over the first 64 positions
MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0  # Sun et al.: |h| > 100 and about 1000x the median
# hook points whose tensors are (B, positions, channels): where one (position, dim) entry can be patched
POSITION_POINTS = ("resid_pre", "ln_1", "attn_out", "resid_mid", "ln_2", "mlp_pre", "mlp_post", "mlp_out",
                   "resid_post")


class AnalyzeError(Exception):
    """Bad input (target, data, arguments): printed as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------------
# metrics: small pure functions over tensors, shared by the report, the tracker, the probes and the tests


def top_entries(absmax, k, offset=0):
    """The k largest entries of a (positions, dims) map as [value, position + offset, dim]."""
    values, flat_idx = absmax.flatten().topk(min(k, absmax.numel()))
    C = absmax.size(1)
    return [[v, i // C + offset, i % C] for v, i in zip(values.tolist(), flat_idx.tolist())]


def sequence_medians(resid):
    """Median |h| of each sequence's hidden state (B, T, C) -> (B,)."""
    return resid.abs().flatten(1).median(dim=1).values


def activation_stats(resid, k=3):
    """Sun et al.'s numbers for one block output resid (B, T, C), real positions only: the k largest |h|
    (largest over the batch at each (position, dim)) as [value, position, dim], the median |h| (per sequence,
    averaged) and the ratio top-1 / median."""
    top = top_entries(resid.abs().amax(0), k)
    median = sequence_medians(resid).mean().item()
    return {"top": top, "median": median, "ratio": safe_ratio(top[0][0], median)}


def safe_ratio(a, b):
    return a / b if b > 0 else float("inf") if a > 0 else float("nan")


def split_pattern(pattern, n_slot=0):
    """(slot columns (B, H, T, n_slot), real keys (B, H, T, T)) of an attention pattern, real query rows only.
    Slot sinks add columns but no rows; a sink-token prefix adds both (its rows are dropped here)."""
    Tq, Tk = pattern.shape[-2:]
    T = Tk - n_slot
    rows = pattern[..., Tq - T:, :]
    return rows[..., :n_slot], rows[..., n_slot:]


def first_token_mass(pattern, n_slot=0):
    """Per head (H,): mean over queries i >= 1 (and the batch) of the attention on real position 0."""
    _, real = split_pattern(pattern, n_slot)
    return real[..., 1:, 0].mean(dim=(0, 2))


def slot_mass(pattern, n_slot=0):
    """Per head (H,): mean over queries i >= 1 of the attention on the dedicated sink (all its columns);
    None when the model has no sink slot. Same queries as first_token_mass, so the two compare."""
    if not n_slot:
        return None
    slot, _ = split_pattern(pattern, n_slot)
    return slot[..., 1:, :].sum(-1).mean(dim=(0, 2))


def sink_alpha(pattern, n_slot=0, on="first", T=SINK_T):
    """Gu et al.'s alpha per sequence and head (B, H): the mean attention of the first T real queries (query 0
    included, as in their 1-based sum) on real position 0 (on='first') or on the sink slot (on='slot')."""
    slot, real = split_pattern(pattern, n_slot)
    column = real[..., :T, 0] if on == "first" else slot[..., :T, :].sum(-1)
    return column.mean(-1)


def rate_from_alphas(alphas, eps=SINK_EPS):
    """Percentage of (sequence, layer, head) triples with alpha > eps: Sink^eps averaged over sequences."""
    return 100.0 * (torch.stack(alphas) > eps).float().mean().item()


def sink_rate(patterns, n_slot=0, eps=SINK_EPS, T=SINK_T, on="first"):
    """Gu et al.'s Sink_1^eps in percent over every layer's pattern; None for on='slot' without a slot."""
    if on == "slot" and not n_slot:
        return None
    return rate_from_alphas([sink_alpha(p, n_slot, on, T) for p in patterns], eps)


def masked_head_mean(values, mask):
    """values (B, H, T), mask (B, T) -> (H,) mean over the masked (sequence, query) pairs; nan if none."""
    weights = mask[:, None, :].to(values.dtype)
    return (values * weights).sum(dim=(0, 2)) / weights.sum()


def bb_masses(pattern, trigger_mask, n_slot=0):
    """Bigram-Backcopy's active-dormant split (Guo et al.), per head: attention on BOS (real position 0) from
    non-trigger queries (dormant) and from trigger queries (active), queries i >= 1; the same on the slot."""
    slot, real = split_pattern(pattern, n_slot)
    queries = torch.ones_like(trigger_mask)
    queries[:, 0] = False
    active, dormant = trigger_mask & queries, ~trigger_mask & queries
    out = {"dormant_bos": masked_head_mean(real[..., 0], dormant),
           "active_bos": masked_head_mean(real[..., 0], active), "dormant_slot": None, "active_slot": None}
    if n_slot:
        on_slot = slot.sum(-1)
        out["dormant_slot"] = masked_head_mean(on_slot, dormant)
        out["active_slot"] = masked_head_mean(on_slot, active)
    return out


def value_norms(v, c_proj_weight, n_prefix=0):
    """The value drain: per head, |W_o,h v| at real position 0 (BOS) and its mean over the other positions.
    v (B, H, positions, D) from the 'v' hook; W_o,h is head h's slice of c_proj. (H,), (H,)."""
    B, H, _, D = v.shape
    W = c_proj_weight.to(v.dtype).view(-1, H, D)  # (C out, head, head dim)
    gram = torch.einsum("chd,che->hde", W, W)  # |W_h v|^2 = v^T (W_h^T W_h) v, without (B, H, T, C) tensors
    v = v[:, :, n_prefix:]
    norms = torch.einsum("bhtd,hde,bhte->bht", v, gram, v).clamp_min(0).sqrt()
    return norms[:, :, 0].mean(0), norms[:, :, 1:].mean(dim=(0, 2))


def position_norms(resid, n_prefix=0):
    """(mean |h| at real position 0, mean over the other real positions) of the vector norms of a (B, P, C)
    tensor: the residual peak for block outputs, the gradient sink for their gradients."""
    norms = resid[:, n_prefix:].norm(dim=-1)
    return norms[:, 0].mean().item(), norms[:, 1:].mean().item()


def key_mass(pattern, n_slot=0):
    """(T,) attention each real key position j receives from the later queries i > j, mean over those queries
    and the heads (entry 0 is first_token_mass averaged over heads; the last key has no later query: nan)."""
    _, real = split_pattern(pattern, n_slot)
    T = real.size(-1)
    later = torch.ones(T, T, dtype=torch.bool, device=real.device).tril(-1)  # [i, j]: i > j
    return ((real * later).sum(-2) / later.sum(0)).mean(dim=(0, 1))


def find_massive(maps, medians, min_abs=MASSIVE_ABS, min_ratio=MASSIVE_RATIO, per_layer=10):
    """Entries of the per-layer |h| maps (positions, dims) above min_abs and min_ratio x that layer's median:
    [{layer, position, dim, value, ratio}], the largest per_layer of each layer."""
    found = []
    for layer, (absmax, median) in enumerate(zip(maps, medians)):
        threshold = max(min_abs, min_ratio * median)
        for value, pos, dim in top_entries(absmax, per_layer):
            if value > threshold:
                found.append({"layer": layer, "position": pos, "dim": dim, "value": value,
                              "ratio": safe_ratio(value, median)})
    return found


# ----------------------------------------------------------------------------------------------------
# running the model with hooks


def capture(model, idx, names, targets=None, reduce=None, patches=None):
    """One forward of model(idx, targets) under no_grad with read hooks at `names`: returns ({name: tensor},
    loss or None). reduce(name, tensor) may shrink what is kept (patterns are T x T per head). patches maps
    hook names to functions that return a replacement tensor; a read at the same name sees the patched one.
    All hooks of the model are cleared afterwards, so the model runs hook-free (and on its fast path) again."""
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
        for name in set(names) | set(patches or {}):
            model.add_hook(name, hook_for(name))
        with torch.no_grad():
            _, loss = model(idx, targets)
    except KeyError as e:
        raise AnalyzeError(e.args[0]) from None
    finally:
        model.clear_hooks()
    return captured, None if loss is None else loss.item()


def residual_grads(model, idx, targets):
    """Gradients of the loss with respect to every block output (resid_post), [(B, P, C)] per layer, through
    torch.autograd.grad: parameter .grad stays untouched (the training step owns it)."""
    resids = {}
    n_layer = model.config.n_layer
    for layer in range(n_layer):
        model.add_hook(f"h.{layer}.resid_post", lambda x, layer=layer: resids.__setitem__(layer, x))
    try:
        with torch.enable_grad():
            _, loss = model(idx, targets)
            tensors = [resids[layer] for layer in range(n_layer)]
            if not all(t.requires_grad for t in tensors):  # frozen model: no gradient to measure
                return None
            return torch.autograd.grad(loss, tensors)
    finally:
        model.clear_hooks()


def layer_reducer(model, trigger_mask=None):
    """reduce() for capture: keeps, per layer, only what the statistics need (no T x T patterns)."""
    n_prefix, n_slot = model.n_prefix, model.n_slot_columns
    blocks = model.transformer.h

    def reduce(name, x):
        layer, point = int(name.split(".")[1]), name.split(".")[2]
        if point == "resid_post":
            x = x.detach().float()
            return {"absmax": x.abs().amax(0), "medians": sequence_medians(x[:, n_prefix:]),
                    "norms": position_norms(x, n_prefix)}
        if point == "pattern":
            x = x.detach().float()
            out = {"first": first_token_mass(x, n_slot), "slot": slot_mass(x, n_slot),
                   "alpha_first": sink_alpha(x, n_slot, "first"),
                   "alpha_slot": sink_alpha(x, n_slot, "slot") if n_slot else None}
            if trigger_mask is not None:
                out["bb"] = bb_masses(x, trigger_mask, n_slot)
            return out
        if point == "v":
            return value_norms(x.detach().float(), blocks[layer].attn.c_proj.weight.detach().float(), n_prefix)
        return x.detach()
    return reduce


def mean_of(items):
    """Mean of a list of equally shaped tensors (or None when the items are None)."""
    if not items or items[0] is None:
        return None
    return torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in items]).mean(0)


def collect(model, batches, trigger_masks=None, k=3, patches=None):
    """Every layer's statistics over the probe batches [(x, y)]: the one pass that the report, the
    interventions, the training tracker and the tests share. trigger_masks (one (B, T) bool per batch) adds
    the Bigram-Backcopy metrics. Returns plain values, plus 'maps' (per layer (T, C) max |h| over sequences,
    real positions) for plots and massive-activation search."""
    cfg = model.config
    n_prefix, n_slot = model.n_prefix, model.n_slot_columns
    bb = trigger_masks is not None
    points = ("resid_post", "pattern", "v") if bb else ("resid_post", "pattern")
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
        absmax = torch.stack([r["absmax"] for r in resid]).amax(0)
        median = torch.cat([r["medians"] for r in resid]).mean().item()
        pos0_norm, other_norm = (sum(r["norms"][j] for r in resid) / len(resid) for j in (0, 1))
        top = top_entries(absmax[n_prefix:], k)
        first, slot = mean_of([a["first"] for a in attn]), mean_of([a["slot"] for a in attn])
        alphas_first.append(torch.cat([a["alpha_first"] for a in attn]))
        if n_slot:
            alphas_slot.append(torch.cat([a["alpha_slot"] for a in attn]))
        entry = {
            "layer": layer, "top": top, "median": median, "ratio": safe_ratio(top[0][0], median),
            "pos0_norm": pos0_norm, "other_norm": other_norm, "pos0_norm_ratio": safe_ratio(pos0_norm, other_norm),
            # a dedicated sink token growing a massive activation is itself interesting: reported apart
            "sink_token_top": top_entries(absmax[:n_prefix], k, offset=-n_prefix) if n_prefix else None,
            "first_token_mass": first.tolist(), "first_token_mass_mean": first.mean().item(),
            "slot_mass": None if slot is None else slot.tolist(),
            "slot_mass_mean": None if slot is None else slot.mean().item(),
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
            "maps": maps, "medians": medians}


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


# ----------------------------------------------------------------------------------------------------
# training-time tracking (train.py: track_interval > 0)


class TrainingTracker:
    """Massive-activation and sink statistics on a fixed probe batch, for metrics.jsonl during training.

        tracker = TrainingTracker(raw_model, cfg, val_loader)
        record = tracker.measure()   # flat dict of JSON values ('track_*' keys)

    The probe batch is drawn once from the val loader, whose state is restored so evaluation is unchanged.
    measure() runs in eval mode, leaves no hooks behind and never touches parameter .grad."""

    MAX_SEQUENCES = 8  # a few sequences are enough for per-layer statistics and keep the overhead small

    def __init__(self, model, cfg, val_loader):
        self.model = model
        state = val_loader.state_dict()
        x, y = val_loader.next_batch()
        val_loader.load_state_dict(state)
        device = next(model.parameters()).device
        self.x, self.y = x[:self.MAX_SEQUENCES].to(device), y[:self.MAX_SEQUENCES].to(device)
        is_bb = cfg.get("dataset") == "bigram_backcopy" and hasattr(val_loader, "trigger_mask")
        self.trigger_mask = val_loader.trigger_mask(self.x) if is_bb else None

    def measure(self):
        model = self.model
        was_training = model.training
        model.eval()
        try:
            masks = None if self.trigger_mask is None else [self.trigger_mask]
            stats = collect(model, [(self.x, self.y)], masks, k=1)
            grads = residual_grads(model, self.x, self.y)
        finally:
            model.clear_hooks()
            model.train(was_training)
        return plain(tracking_record(stats, grads, model.n_prefix))

    def close(self):
        self.model.clear_hooks()
        self.x = self.y = self.trigger_mask = None


def tracking_record(stats, grads, n_prefix):
    """Flat 'track_*' keys from collect()'s statistics and the block-output gradients."""
    layers = stats["layers"]

    def per_layer(key):
        return [entry[key] for entry in layers]
    record = {
        "track_loss": stats["loss"],
        "track_top1": [e["top"][0][0] for e in layers], "track_top1_pos": [e["top"][0][1] for e in layers],
        "track_top1_dim": [e["top"][0][2] for e in layers], "track_median": per_layer("median"),
        "track_ratio": per_layer("ratio"), "track_pos0_norm_ratio": per_layer("pos0_norm_ratio"),
        "track_first_mass": per_layer("first_token_mass_mean"),
        "track_slot_mass": per_layer("slot_mass_mean") if layers[0]["slot_mass"] is not None else None,
        "track_sink_rate": stats["sink_rate"], "track_slot_sink_rate": stats["slot_sink_rate"],
    }
    if layers[0]["sink_token_top"] is not None:
        record["track_sink_token_top1"] = [e["sink_token_top"][0][0] for e in layers]
    if grads is not None:  # gradient sinks: the gradient on position 0 against the other positions
        norms = [position_norms(g.float(), n_prefix) for g in grads]
        record["track_grad_pos0"] = [n[0] for n in norms]
        record["track_grad_other"] = [n[1] for n in norms]
        record["track_grad_pos0_ratio"] = [safe_ratio(*n) for n in norms]
        # dLoss/dh at each layer's top-1 entry: descent moves h against it, so a gradient of the opposite sign
        # to the peak's value means the next step (before the optimizer's scaling) pushes the peak higher
        record["track_grad_top1"] = [g[:, n_prefix + e["top"][0][1], e["top"][0][2]].float().mean().item()
                                     for g, e in zip(grads, layers)]
    if "bb" in layers[0]:
        for key in ("dormant_bos", "active_bos", "dormant_slot", "active_slot", "value_bos", "value_other",
                    "value_ratio", "resid_bos", "resid_other", "resid_ratio"):
            values = [e["bb"][key] for e in layers]
            record[f"track_bb_{key}"] = None if values[0] is None else values
    return record


def plain(obj):
    """JSON-ready copy: tensors to lists, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(obj, torch.Tensor):
        return plain(obj.tolist())
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


# ----------------------------------------------------------------------------------------------------
# targets and data


def load_target(target, device):
    """(model in eval mode, tokenizer meta, training config dict, kind) for an out_dir, a checkpoint or a
    GPT-2 directory (a meta.json beside its config.json overrides the GPT-2 BPE tokenizer)."""
    from train import RunError, load_checkpoint, model_from_checkpoint
    checkpoint_path = os.path.join(target, "ckpt.pt") if os.path.isdir(target) else target
    try:
        if os.path.isfile(checkpoint_path):
            checkpoint = load_checkpoint(checkpoint_path)
            model = model_from_checkpoint(checkpoint, checkpoint_path)
            meta, cfg, kind = checkpoint.get("meta") or {}, checkpoint.get("config") or {}, "checkpoint"
        elif os.path.isfile(os.path.join(target, "config.json")) or looks_like_hub_name(target):
            model = GPT.from_pretrained(target)
            meta_path = os.path.join(target, "meta.json")
            if os.path.isfile(meta_path):
                with open(meta_path) as f:
                    meta = json.load(f)
            else:
                meta = {"tokenizer": "gpt2", "bos_token": model.config.bos_token, "vocab_size": model.config.vocab_size}
            cfg, kind = {}, "gpt2"
        else:
            raise AnalyzeError(f"{target} is neither a run folder with ckpt.pt, a checkpoint, nor a GPT-2 directory")
    except RunError as e:
        raise AnalyzeError(str(e)) from None
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise AnalyzeError(f"{target}: {e}") from None
    return model.to(device).eval(), meta, cfg, kind


def looks_like_hub_name(target):
    """'gpt2' or 'openai-community/gpt2' (fetched when the hub is reachable), not a missing local path."""
    return not os.path.exists(target) and not target.startswith((".", "/", "~")) and not target.endswith(".pt") \
        and target.count("/") <= 1


def probe_batches(args, model, meta, cfg, kind, device):
    """([(x, y)], trigger masks or None, description) for --text, --data or the target's own dataset."""
    T = min(args.block_size or model.config.block_size, model.config.block_size)
    # by default sequences start as in training: BOS first for GPT-2 (the bos_token study) and Bigram-Backcopy
    trained_with_bos = cfg.get("prepend_bos") or cfg.get("dataset") == "bigram_backcopy"
    bos = args.bos if args.bos is not None else (kind == "gpt2" or bool(trained_with_bos))
    if args.text is not None:
        from sinkgpt.tokenizer import load_tokenizer, read_text_argument
        try:
            ids = load_tokenizer(meta).encode(read_text_argument(args.text))
        except ValueError as e:
            raise AnalyzeError(str(e)) from None
        ids = ([meta["bos_token"]] if bos else []) + ids
        if len(ids) < 2:
            raise AnalyzeError("the text gives fewer than 2 tokens")
        ids = torch.tensor(ids[:T + 1], device=device)[None]
        batches, source = [(ids[:, :-1], ids[:, 1:])], {"text": args.text[:200], "bos": bos}
        # a Bigram-Backcopy vocabulary names its triggers: the active-dormant split applies to any text
        triggers = meta.get("triggers")
        masks = [torch.isin(batches[0][0], torch.tensor(triggers, device=device))] if triggers else None
    else:
        dataset = args.data or cfg.get("dataset") or ("shakespeare" if kind == "gpt2" else None)
        if dataset is None:
            raise AnalyzeError("the target names no dataset: give --data DATASET or --text TEXT")
        loader = make_probe_loader(dataset, cfg, args, T, bos, device)
        batches = [loader.next_batch() for _ in range(args.batches)]
        masks = [loader.trigger_mask(x) for x, _ in batches] if dataset == "bigram_backcopy" else None
        source = {"dataset": dataset, "split": "val", "batches": args.batches, "batch_size": args.batch_size,
                  "bos": bos if dataset != "bigram_backcopy" else True}
    biggest = max(int(x.max()) for x, _ in batches)
    if biggest >= model.config.vocab_size:
        raise AnalyzeError(f"the data has token id {biggest}, outside the model's vocabulary of "
                           f"{model.config.vocab_size}: wrong dataset for this model?")
    return batches, masks, source


def make_probe_loader(dataset, cfg, args, T, bos, device):
    try:
        if dataset == "bigram_backcopy":
            from sinkgpt.bigram_backcopy import BigramBackcopy
            return BigramBackcopy("val", args.batch_size, T, seed=args.seed, n_triggers=cfg.get("bb_triggers", 3),
                                  device=device)
        from sinkgpt.loader import TokenLoader, open_dataset
        return TokenLoader(open_dataset(dataset), "val", args.batch_size, T, seed=args.seed, prepend_bos=bos,
                           align_to_docs=bool(cfg.get("align_to_docs")), device=device)
    except (FileNotFoundError, ValueError) as e:
        raise AnalyzeError(str(e).splitlines()[0]) from None


# ----------------------------------------------------------------------------------------------------
# the report


def build_report(model, batches, masks=None, k=5, min_ratio=100.0):
    """report.json's content (and the (T, C) |h| maps for the plots)."""
    stats = collect(model, batches, masks, k)
    maps, medians = stats.pop("maps"), stats.pop("medians")
    ratios = [layer["ratio"] for layer in stats["layers"]]
    best = max(range(len(ratios)), key=lambda i: ratios[i] if math.isfinite(ratios[i]) else float("inf"))
    report = {
        "model": model.config.to_dict(), "n_prefix": model.n_prefix, "n_slot_columns": model.n_slot_columns,
        **stats,
        "sink_rate_eps": SINK_EPS, "sink_rate_T": SINK_T,
        "max_ratio": {"layer": best, "ratio": ratios[best], "top": stats["layers"][best]["top"][0]},
        "massive_criteria": {"sun": f"|h| > {MASSIVE_ABS:g} and >= {MASSIVE_RATIO:g} x median",
                             "ratio_only": f"|h| >= {min_ratio:g} x median"},
        "massive": find_massive(maps, medians),
        "massive_ratio_only": find_massive(maps, medians, min_abs=0.0, min_ratio=min_ratio),
    }
    return report, maps


def write_report(report, maps, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    best = report["max_ratio"]["layer"]
    plots = [plot_activations(report["layers"], os.path.join(out_dir, "activations.png")),
             plot_activation_map(maps[best], best, os.path.join(out_dir, "activation_map.png")),
             plot_masses(report["layers"], os.path.join(out_dir, "attention_mass.png"))]
    if "bb" in report["layers"][0]:
        plots.append(plot_bb(report["layers"], os.path.join(out_dir, "bb.png")))
    report["plots"] = [os.path.basename(p) for p in plots]
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(plain(report), f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(report))


def fmt(value, digits=3):
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def report_markdown(r):
    cfg = r["model"]
    lines = [f"# Massive activations and attention sinks: {r.get('target', '')}", "",
             f"Model: {cfg['n_layer']} layers, {cfg['n_head']} heads, n_embd {cfg['n_embd']}, sink={cfg['sink']}, "
             f"attn_fn={cfg['attn_fn']}, attn_gate={cfg['attn_gate']}. Data: {json.dumps(r.get('data', {}))}; "
             f"{r['n_sequences']} sequences of {r['seq_len']} tokens; loss {fmt(r['loss'], 4)}.", "",
             f"- Sink rate (Gu et al., alpha on position 0 > {r['sink_rate_eps']}, first {r['sink_rate_T']} "
             f"positions): **{fmt(r['sink_rate'])}%** of (layer, head) pairs"
             + (f"; on the dedicated slot: **{fmt(r['slot_sink_rate'])}%**" if r["slot_sink_rate"] is not None else ""),
             f"- Largest top-1/median ratio: layer {r['max_ratio']['layer']}, {fmt(r['max_ratio']['ratio'])}x "
             f"(|h| {fmt(r['max_ratio']['top'][0])} at position {r['max_ratio']['top'][1]}, dim {r['max_ratio']['top'][2]})",
             f"- Massive activations ({r['massive_criteria']['sun']}): "
             + (", ".join(f"layer {m['layer']} pos {m['position']} dim {m['dim']} ({m['value']:.4g})"
                          for m in r["massive"][:12]) or "none"),
             f"- Ratio only ({r['massive_criteria']['ratio_only']}): {len(r['massive_ratio_only'])} entries"
             + (f", e.g. layer {r['massive_ratio_only'][0]['layer']} pos {r['massive_ratio_only'][0]['position']} "
                f"dim {r['massive_ratio_only'][0]['dim']}" if r["massive_ratio_only"] else ""), "",
             "| layer | top-1 (pos, dim) | top-2 | top-3 | median | ratio | pos-0 norm / others | mass on pos 0 "
             "| mass on slot |", "|---|---|---|---|---|---|---|---|---|"]
    for e in r["layers"]:
        tops = [f"{v:.4g} ({p}, {d})" for v, p, d in e["top"][:3]] + ["-"] * (3 - len(e["top"][:3]))
        lines.append(f"| {e['layer']} | {' | '.join(tops)} | {fmt(e['median'])} | {fmt(e['ratio'])} | "
                     f"{fmt(e['pos0_norm_ratio'])} | {fmt(e['first_token_mass_mean'])} | {fmt(e['slot_mass_mean'])} |")
    if r["layers"][0]["sink_token_top"] is not None:
        lines += ["", "Sink-token prefix (positions < 0), top-1 |h| per layer: " +
                  ", ".join(f"{e['sink_token_top'][0][0]:.4g} (pos {e['sink_token_top'][0][1]}, dim "
                            f"{e['sink_token_top'][0][2]})" for e in r["layers"])]
    if "bb" in r["layers"][0]:
        lines += ["", "## Bigram-Backcopy (per head: layer.head)", "",
                  "| head | BOS, dormant | BOS, active | slot, dormant | slot, active | value norm BOS / others |",
                  "|---|---|---|---|---|---|"]
        for e in r["layers"]:
            bb = e["bb"]
            for h in range(len(bb["dormant_bos"])):
                slot = [fmt(bb[k][h]) if bb[k] is not None else "-" for k in ("dormant_slot", "active_slot")]
                lines.append(f"| {e['layer']}.{h} | {fmt(bb['dormant_bos'][h])} | {fmt(bb['active_bos'][h])} | "
                             f"{slot[0]} | {slot[1]} | {fmt(bb['value_bos'][h])} / {fmt(bb['value_other'][h])} |")
        lines += ["", "BOS residual norm / others after each block: " +
                  ", ".join(f"{fmt(e['bb']['resid_bos'])} / {fmt(e['bb']['resid_other'])}" for e in r["layers"])]
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in r.get("plots", [])), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# plots (matplotlib is imported only here)


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


# ----------------------------------------------------------------------------------------------------
# interventions and probes


def position_index(model, hook_name, pos):
    """Index of real position pos in the tensor at a hook (sink-token prefix first, except at 'embed');
    negative positions reach the sink tokens."""
    offset = 0 if hook_name == "embed" else model.n_prefix
    if pos < -offset:
        raise AnalyzeError(f"position {pos} is before the first sink token (the model has {model.n_prefix})")
    return offset + pos


def check_position(pos, batches):
    length = batches[0][0].size(1)
    if pos >= length:
        raise AnalyzeError(f"position {pos} is beyond the sequence length {length}")


def hook_name(point, layer, model):
    if point in ("embed", "ln_f"):
        return point
    if point not in POSITION_POINTS:
        raise AnalyzeError(f"--hook {point!r} is not one of embed, ln_f, {', '.join(POSITION_POINTS)}")
    if layer is None:
        raise AnalyzeError(f"--hook {point} needs --layer (0 to {model.config.n_layer - 1})")
    if not 0 <= layer < model.config.n_layer:
        raise AnalyzeError(f"--layer must be in [0, {model.config.n_layer - 1}] for --hook {point}")
    return f"h.{layer}.{point}"


def intervene(model, batches, name, pos, dim, op, value, masks=None):
    """Set, add to or scale one entry at (hook, position, dim) in every sequence: the change in loss and in
    the attention mass on position 0 (and the slot) for every layer x head."""
    patch = entry_patch([(position_index(model, name, pos), dim, value)], op)
    before = collect(model, batches, masks, k=1)
    after = collect(model, batches, masks, k=1, patches={name: patch})
    result = {"hook": name, "position": pos, "dim": dim, "op": op, "value": value,
              "loss_before": before["loss"], "loss_after": after["loss"],
              "delta_loss": after["loss"] - before["loss"]}
    for key in ("first_token_mass", "slot_mass"):
        b, a = [e[key] for e in before["layers"]], [e[key] for e in after["layers"]]
        result[f"{key}_before"], result[f"{key}_after"] = (None, None) if b[0] is None else (b, a)
    result["sink_rate_before"], result["sink_rate_after"] = before["sink_rate"], after["sink_rate"]
    result["top1_before"] = [e["top"][0] for e in before["layers"]]
    result["top1_after"] = [e["top"][0] for e in after["layers"]]
    return result


def ablate(model, batches, entries, masks=None):
    """Sun et al.: set massive activations [(layer, position, dim)] of the block output to zero, or to their
    mean over the probe sequences, and measure the loss."""
    names = sorted({f"h.{layer}.resid_post" for layer, _, _ in entries})
    captured = [capture(model, x, names, y)[0] for x, y in batches]
    means = []
    for layer, pos, dim in entries:
        index = position_index(model, "resid_post", pos)
        means.append(torch.cat([c[f"h.{layer}.resid_post"][:, index, dim] for c in captured]).mean().item())
    result = {"entries": [{"layer": layer, "position": pos, "dim": dim, "mean": mean}
                          for (layer, pos, dim), mean in zip(entries, means)]}
    for mode in ("none", "zero", "mean"):
        patches = {}
        for (layer, pos, dim), mean in zip(entries, means):
            if mode != "none":
                patches.setdefault(f"h.{layer}.resid_post", []).append(
                    (position_index(model, "resid_post", pos), dim, 0.0 if mode == "zero" else mean))
        stats = collect(model, batches, masks, k=1, patches={n: entry_patch(e) for n, e in patches.items()})
        result[f"loss_{mode}"] = stats["loss"]
        result[f"first_token_mass_{mode}"] = [e["first_token_mass_mean"] for e in stats["layers"]]
    result["delta_zero"] = result["loss_zero"] - result["loss_none"]
    result["delta_mean"] = result["loss_mean"] - result["loss_none"]
    return result


def repeat_probe(model, token, n, bos_token):
    """Yona et al.: one token repeated n times, without and with a leading BOS (same length): per layer the
    residual norm at every position, the attention each key position receives, mass on position 0 and the
    largest mass any later position gets."""
    n = min(n, model.config.block_size)
    if n < 3:
        raise AnalyzeError("--n must be at least 3 (position 0 and later positions to compare)")
    device = next(model.parameters()).device
    variants = {"no_bos": [token] * n, "bos": [bos_token] + [token] * (n - 1)}
    names = [f"h.{layer}.{p}" for layer in range(model.config.n_layer) for p in ("resid_post", "pattern")]
    n_prefix, n_slot = model.n_prefix, model.n_slot_columns
    out = {"token": token, "n": n, "variants": {}}
    for variant, ids in variants.items():
        got, _ = capture(model, torch.tensor([ids], device=device), names)
        layers = []
        for layer in range(model.config.n_layer):
            pattern = got[f"h.{layer}.pattern"].float()
            received = key_mass(pattern, n_slot)
            # keys with at least 8 later queries (or the first half): a late key's mean over few queries is noise
            candidates = received[1:max(2, min(n - 8, n // 2 + 1))]
            later = int(candidates.argmax()) + 1 if n > 2 else None
            slot = slot_mass(pattern, n_slot)
            layers.append({"layer": layer, "resid_norm": got[f"h.{layer}.resid_post"][0, n_prefix:].norm(dim=-1).tolist(),
                           "received": received.tolist(), "mass_pos0": received[0].item(),
                           "later_max": None if later is None else received[later].item(), "later_max_pos": later,
                           "slot_mass": None if slot is None else slot.mean().item()})
        out["variants"][variant] = layers
    return out


def plot_repeat(result, path):
    plt = pyplot()
    names = list(result["variants"])
    fig, axes = plt.subplots(2, len(names), figsize=(11, 7), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for col, variant in enumerate(names):
        layers = result["variants"][variant]
        for e in layers:
            color = cmap(e["layer"] / max(1, len(layers) - 1))
            axes[0, col].plot(e["resid_norm"], color=color, label=f"layer {e['layer']}")
            axes[1, col].plot(e["received"], color=color)
        axes[0, col].set(yscale="log", title=f"{variant}: residual norm per position", xlabel="position")
        axes[1, col].set(title=f"{variant}: attention received per key position", xlabel="key position")
    axes[0, 0].legend(fontsize=7)
    return save(fig, path)


def attribute(model, batches, pos, dim, top=10):
    """For residual dim at real position pos: each layer's attention and MLP contribution (mean over the
    sequences) and the MLP neurons n with the largest activation x W_out[n, dim], plus the output bias."""
    L = model.config.n_layer
    names = ["embed"] + [f"h.{layer}.{p}" for layer in range(L) for p in ("attn_out", "mlp_post", "mlp_out",
                                                                           "resid_post")]
    index = position_index(model, "resid_post", pos)
    runs = [capture(model, x, names, y)[0] for x, y in batches]

    def mean_at(name, i):
        return torch.cat([r[name][:, i].float() for r in runs]).mean(0)
    result = {"position": pos, "dim": dim, "embed": mean_at("embed", pos)[dim].item() if pos >= 0 else None,
              "layers": []}
    for layer in range(L):
        mlp = model.transformer.h[layer].mlp
        act = mean_at(f"h.{layer}.mlp_post", index)
        weight = mlp.c_proj.weight[dim].detach().float()
        contributions = act * weight
        bias = mlp.c_proj.bias[dim].item() if mlp.c_proj.bias is not None else 0.0
        order = contributions.abs().argsort(descending=True)[:top]
        result["layers"].append({
            "layer": layer, "attn": mean_at(f"h.{layer}.attn_out", index)[dim].item(),
            "mlp": mean_at(f"h.{layer}.mlp_out", index)[dim].item(), "resid_post": mean_at(f"h.{layer}.resid_post", index)[dim].item(),
            "bias": bias, "neuron_sum": contributions.sum().item(),
            "neurons": [[int(n), act[n].item(), weight[n].item(), contributions[n].item()] for n in order]})
    return result


# ----------------------------------------------------------------------------------------------------
# comparing runs


def read_metrics(run):
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise AnalyzeError(f"{run}: no metrics.jsonl")
    events = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    raise AnalyzeError(f"{path}:{number} is not JSON") from None
                if not isinstance(event, dict):
                    raise AnalyzeError(f"{path}:{number} is not a JSON object")
                events.append(event)
    return events


def finite_max(values):
    values = [v for v in values or [] if v is not None and math.isfinite(v)]
    return max(values) if values else None


def finite_mean(values):
    values = [v for v in values or [] if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def run_series(events):
    """Curves over iterations: val loss, max top-1/median ratio, mean masses on position 0 and on the slot."""
    val = [(e["iter"], e["val_loss"]) for e in events if e.get("val_loss") is not None]
    tracked = [e for e in events if "track_ratio" in e]
    return {"val_loss": val,
            "max_ratio": [(e["iter"], finite_max(e["track_ratio"])) for e in tracked],
            "first_mass": [(e["iter"], finite_mean(e["track_first_mass"])) for e in tracked],
            "slot_mass": [(e["iter"], finite_mean(e["track_slot_mass"])) for e in tracked
                          if e.get("track_slot_mass") is not None]}


def final_figures(events):
    """The row an ablation table publishes: last val loss, max ratio, % heads sinking on position 0 / slot."""
    val = [e for e in events if e.get("val_loss") is not None]
    tracked = [e for e in events if "track_ratio" in e]
    last = tracked[-1] if tracked else {}
    return {"iter": max((e.get("iter", 0) for e in events), default=0),
            "val_loss": val[-1]["val_loss"] if val else None, "max_ratio": finite_max(last.get("track_ratio")),
            "sink_rate": last.get("track_sink_rate"), "slot_sink_rate": last.get("track_slot_sink_rate")}


def compare(runs, out_dir, names=None):
    names = names or [os.path.basename(os.path.normpath(r)) or r for r in runs]
    if len(set(names)) < len(names):  # e.g. out/a/seed1 and out/b/seed1: name runs by their whole path
        names = list(runs)
    series = {name: run_series(read_metrics(r)) for name, r in zip(names, runs)}
    finals = {name: final_figures(read_metrics(r)) for name, r in zip(names, runs)}
    rows = ["| run | iter | val loss | max top-1/median | % heads sinking on pos 0 | % heads sinking on slot |",
            "|---|---|---|---|---|---|"]
    for name, f in finals.items():
        rows.append(f"| {name} | {f['iter']} | {fmt(f['val_loss'], 4)} | {fmt(f['max_ratio'])} | "
                    f"{fmt(f['sink_rate'])} | {fmt(f['slot_sink_rate'])} |")
    table = "\n".join(rows) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    plot_compare(series, os.path.join(out_dir, "compare.png"))
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(f"# Runs compared\n\n{table}\n![compare](compare.png)\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(plain({"runs": dict(zip(names, runs)), "final": finals, "series": series}), f, indent=1)
    return table


def plot_compare(series, path):
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("val_loss", "val loss", "linear"), ("max_ratio", "max top-1/median |h| over layers", "log"),
              ("first_mass", "mean attention mass on position 0", "linear"),
              ("slot_mass", "mean attention mass on the sink slot", "linear")]
    for ax, (key, title, scale) in zip(axes.ravel(), panels):
        for color, (name, s) in enumerate(series.items()):  # one colour per run in every panel
            points = [(i, v) for i, v in s[key] if v is not None]
            if points:
                ax.plot(*zip(*points), marker=".", color=plt.get_cmap("tab20")(color % 20), label=name)
        ax.set(title=title, xlabel="iter")
        if ax.lines:
            ax.set_yscale(scale)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data (tracking off, or no sink slot)", ha="center", va="center",
                    transform=ax.transAxes)
    return save(fig, path)


# ----------------------------------------------------------------------------------------------------
# command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 1, like every other bad input
        raise AnalyzeError(message)


def add_target_args(p, data=True):
    p.add_argument("target", help="a run folder (ckpt.pt), a checkpoint file, or a GPT-2 directory")
    if data:
        p.add_argument("--data", help="a prepared dataset name or 'bigram_backcopy' (val split); default: the "
                                      "target's own dataset")
        p.add_argument("--text", help="text to analyse, or FILE:path (tokenised with the target's tokenizer; "
                                      "the first block_size tokens)")
        p.add_argument("--batches", type=int, default=4, help="probe batches drawn from --data")
        p.add_argument("--batch_size", type=int, default=8)
        p.add_argument("--block_size", type=int, default=0, help="sequence length (default: the model's)")
        p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                       help="start each sequence with BOS (default: as trained; on for GPT-2 directories and "
                            "Bigram-Backcopy)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--report", help="folder for the JSON (and PNG) output")


def parse_args(argv):
    commands = ("report", "intervene", "ablate", "repeat", "attribute", "compare")
    if argv and argv[0] not in commands and argv[0] not in ("-h", "--help"):
        argv = ["report"] + list(argv)
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("report", help="per-layer activations, sink masses, sink rate, plots")
    add_target_args(p)
    p.add_argument("--k", type=int, default=5, help="largest |h| entries kept per layer")
    p.add_argument("--min_ratio", type=float, default=100.0, help="ratio-only massive criterion (x median)")
    p = sub.add_parser("intervene", help="set / add to / scale one activation entry")
    add_target_args(p)
    p.add_argument("--hook", default="resid_post", help=f"embed, ln_f or one of {', '.join(POSITION_POINTS)}")
    p.add_argument("--layer", type=int)
    p.add_argument("--pos", type=int, default=0, help="real position (negative: sink tokens)")
    p.add_argument("--dim", type=int, required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--set", type=float)
    group.add_argument("--add", type=float)
    group.add_argument("--scale", type=float)
    p = sub.add_parser("ablate", help="zero vs mean ablation of massive activations (Sun et al.)")
    add_target_args(p)
    p.add_argument("--entry", action="append", default=[], metavar="LAYER:POS:DIM",
                   help="ablate this block-output entry (repeatable); default: the detected massive activations")
    p.add_argument("--min_ratio", type=float, default=100.0)
    p = sub.add_parser("repeat", help="one token repeated N times, with and without BOS (Yona et al.)")
    add_target_args(p, data=False)
    p.add_argument("--token", type=int, help="token id to repeat")
    p.add_argument("--string", default=" the", help="text whose first token is repeated (when --token is not given)")
    p.add_argument("--n", type=int, default=64)
    p = sub.add_parser("attribute", help="which MLP neurons write residual dim D at position P")
    add_target_args(p)
    p.add_argument("--pos", type=int, default=0)
    p.add_argument("--dim", type=int, help="default: the top-1 entry of the layer with the largest ratio")
    p.add_argument("--top", type=int, default=10)
    p = sub.add_parser("compare", help="runs' metrics.jsonl overlaid, and a table of final figures")
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    p.add_argument("--report", required=True)
    return parser.parse_args(argv)


def check_counts(args):
    for key in ("batches", "batch_size", "n", "k", "top"):
        if getattr(args, key, 1) is not None and getattr(args, key, 1) < 1:
            raise AnalyzeError(f"--{key} must be >= 1")


def write_json(out_dir, name, obj):
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(plain(obj), f, indent=1)


def cmd_report(args, model, batches, masks, source):
    report, maps = build_report(model, batches, masks, args.k, args.min_ratio)
    report = {"target": args.target, "data": source, **report}
    write_report(report, maps, args.report)
    print(report_markdown(report))
    print(f"wrote {args.report}/report.json, report.md, {', '.join(report['plots'])}")


def cmd_intervene(args, model, batches, masks, source):
    name = hook_name(args.hook, args.layer, model)
    mlp = model.transformer.h[0].mlp
    width = {"mlp_pre": mlp.c_fc.out_features, "mlp_post": mlp.c_proj.in_features}.get(args.hook, model.config.n_embd)
    if not 0 <= args.dim < width:
        raise AnalyzeError(f"--dim must be in [0, {width - 1}] at {args.hook}")
    check_position(args.pos, batches)
    op, value = next((op, v) for op, v in (("set", args.set), ("add", args.add), ("scale", args.scale)) if v is not None)
    result = intervene(model, batches, name, args.pos, args.dim, op, value, masks)
    print(f"{op} {name}[pos {args.pos}, dim {args.dim}] {'=' if op == 'set' else '+=' if op == 'add' else '*='} "
          f"{value:g}: loss {result['loss_before']:.4f} -> {result['loss_after']:.4f} ({result['delta_loss']:+.4f}); "
          f"sink rate {fmt(result['sink_rate_before'])}% -> {fmt(result['sink_rate_after'])}%")
    for layer, (b, a) in enumerate(zip(result["first_token_mass_before"], result["first_token_mass_after"])):
        print(f"layer {layer}: mass on pos 0 per head " + " ".join(f"{x:.3f}->{y:.3f}" for x, y in zip(b, a)))
    write_json(args.report, "intervene.json", {"target": args.target, "data": source, **result})
    if args.report:
        plot_delta(result["first_token_mass_before"], result["first_token_mass_after"],
                   os.path.join(args.report, "intervene.png"), f"change in mass on position 0 ({op} {value:g})")


def parse_entry(text, model):
    try:
        layer, pos, dim = (int(part) for part in text.split(":"))
    except ValueError:
        raise AnalyzeError(f"--entry {text!r} is not LAYER:POS:DIM") from None
    if not 0 <= layer < model.config.n_layer or not 0 <= dim < model.config.n_embd:
        raise AnalyzeError(f"--entry {text}: layer or dim out of range")
    return layer, pos, dim


def cmd_ablate(args, model, batches, masks, source):
    entries = [parse_entry(e, model) for e in args.entry]
    for _, pos, _ in entries:
        check_position(pos, batches)
        position_index(model, "resid_post", pos)
    if not entries:  # Sun et al. intervene where the massive activations first appear
        report, _ = build_report(model, batches, masks, 1, args.min_ratio)
        found = report["massive"] or report["massive_ratio_only"]
        if not found:
            raise AnalyzeError("no massive activation detected; name one with --entry LAYER:POS:DIM")
        first = min(m["layer"] for m in found)
        entries = [(m["layer"], m["position"], m["dim"]) for m in found if m["layer"] == first]
    result = ablate(model, batches, entries, masks)
    print("ablated " + ", ".join(f"layer {e['layer']} pos {e['position']} dim {e['dim']} (mean {e['mean']:.4g})"
                                 for e in result["entries"]))
    print(f"loss: original {result['loss_none']:.4f}, zero {result['loss_zero']:.4f} ({result['delta_zero']:+.4f}), "
          f"mean {result['loss_mean']:.4f} ({result['delta_mean']:+.4f})")
    write_json(args.report, "ablate.json", {"target": args.target, "data": source, **result})


def cmd_repeat(args, model, meta):
    token = args.token
    if token is None:
        from sinkgpt.tokenizer import load_tokenizer
        try:
            ids = load_tokenizer(meta).encode(args.string)
        except ValueError as e:
            raise AnalyzeError(str(e)) from None
        if not ids:
            raise AnalyzeError("--string gives no token")
        token = ids[0]
    if not 0 <= token < model.config.vocab_size:
        raise AnalyzeError(f"--token {token} is outside the vocabulary of {model.config.vocab_size}")
    result = repeat_probe(model, token, args.n, meta.get("bos_token", model.config.bos_token))
    for variant, layers in result["variants"].items():
        for e in layers:
            norms = e["resid_norm"]
            print(f"{variant} layer {e['layer']}: resid norm pos 0 {norms[0]:.3g}, later max {max(norms[1:] or [0]):.3g};"
                  f" mass on pos 0 {e['mass_pos0']:.3f}, most on a later position {fmt(e['later_max'])} "
                  f"(pos {e['later_max_pos']})" + (f", slot {e['slot_mass']:.3f}" if e["slot_mass"] is not None else ""))
    write_json(args.report, "repeat.json", {"target": args.target, **result})
    if args.report:
        plot_repeat(result, os.path.join(args.report, "repeat.png"))


def cmd_attribute(args, model, batches, masks, source):
    dim = args.dim
    if dim is None:
        report, _ = build_report(model, batches, masks, 1)
        layer = report["layers"][report["max_ratio"]["layer"]]
        args.pos, dim = layer["top"][0][1], layer["top"][0][2]
    if not 0 <= dim < model.config.n_embd:
        raise AnalyzeError(f"--dim must be in [0, {model.config.n_embd - 1}]")
    position_index(model, "resid_post", args.pos)
    check_position(args.pos, batches)
    result = attribute(model, batches, args.pos, dim, args.top)
    print(f"residual dim {dim} at position {args.pos} (mean over sequences); embedding {fmt(result['embed'])}")
    for e in result["layers"]:
        neurons = ", ".join(f"n{n}: {a:.3g} x {w:.3g} = {c:.4g}" for n, a, w, c in e["neurons"][:3])
        print(f"layer {e['layer']}: attn {e['attn']:+.4g}, mlp {e['mlp']:+.4g} (bias {e['bias']:+.3g}), "
              f"block output {e['resid_post']:.4g}; top neurons {neurons}")
    write_json(args.report, "attribute.json", {"target": args.target, "data": source, **result})


def check_report_dir(report):
    """Make --report's folder before any work, so a bad path fails first, not after the analysis."""
    if report:
        try:
            os.makedirs(report, exist_ok=True)
        except OSError as e:
            raise AnalyzeError(f"--report {report}: cannot create the folder ({e.strerror})") from None


def run(argv):
    args = parse_args(argv)
    check_counts(args)
    check_report_dir(getattr(args, "report", None))
    if args.command == "compare":
        print(compare(args.runs, args.report), end="")
        print(f"wrote {args.report}/compare.md, compare.json, compare.png")
        return
    torch.manual_seed(args.seed)
    from train import pick_device  # the one device choice of the project: cuda, then mps, then cpu
    device = pick_device(args.device)
    if args.command == "report" and not args.report:
        raise AnalyzeError("give --report DIR for the report files")
    model, meta, cfg, kind = load_target(args.target, device)
    if args.command == "repeat":
        return cmd_repeat(args, model, meta)
    batches, masks, source = probe_batches(args, model, meta, cfg, kind, device)
    commands = {"report": cmd_report, "intervene": cmd_intervene, "ablate": cmd_ablate, "attribute": cmd_attribute}
    commands[args.command](args, model, batches, masks, source)


def main(argv):
    from train import RunError  # e.g. a device this machine does not have
    try:
        run(argv)
    except (AnalyzeError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
