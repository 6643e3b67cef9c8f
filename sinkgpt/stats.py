"""
Sink and massive-activation statistics: small pure functions over tensors (block outputs, attention patterns,
values), shared by the analysis report, the training-time tracker, the probes and the study. Every metric is
defined in docs/sinks.md.

Imports nothing of ours.
"""

import math

import torch

SINK_EPS, SINK_T = 0.3, 64  # Gu et al.: a head sinks when alpha > 0.3, measured over the first 64 positions
MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0  # Sun et al.: |h| > 100 and about 1000x the median


def top_entries(absmax, k, offset=0):
    """The k largest entries of a (positions, dims) map as [value, position + offset, dim]."""
    values, flat_idx = absmax.flatten().topk(min(k, absmax.numel()))
    C = absmax.size(1)
    return [[v, i // C + offset, i % C] for v, i in zip(values.tolist(), flat_idx.tolist())]


def sequence_medians(resid):
    """Median |h| of each sequence's hidden state (B, T, C) -> (B,)."""
    return resid.abs().flatten(1).median(dim=1).values


def sequence_ratios(resid):
    """Each sequence's own top-1 / median |h| of its hidden state (B, T, C) -> (B,): a layer's ratio is the
    largest of these, so the top-1 and the median it divides come from the same sequence."""
    flat = resid.abs().flatten(1)
    return flat.amax(dim=1) / flat.median(dim=1).values


def sun_massive(layer):
    """Sun et al.'s criterion on a layer's top-1 entry: |h| > 100 and >= 1000 x the layer's median."""
    return layer["top"][0][0] > MASSIVE_ABS and layer["ratio"] >= MASSIVE_RATIO


def largest_ratio_layer(layers):
    """Index of the layer with the largest top-1/median ratio (an infinite ratio, a zero median, counts as the
    largest; a NaN as the smallest)."""
    def key(i):
        ratio = layers[i]["ratio"]
        return float("-inf") if math.isnan(ratio) else ratio
    return max(range(len(layers)), key=key)


def safe_ratio(a, b):
    return a / b if b > 0 else float("inf") if a > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------
# attention patterns


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


def masked_head_mean(values, mask):
    """values (B, H, T), mask (B, T) -> (H,) mean over the masked (sequence, query) pairs; nan if none."""
    weights = mask[:, None, :].to(values.dtype)
    return (values * weights).sum(dim=(0, 2)) / weights.sum()


def bb_masses(pattern, trigger_mask, n_slot=0, window=0):
    """Bigram-Backcopy's active-dormant split (Guo et al.), per head: attention on BOS (real position 0) from
    non-trigger queries (dormant) and from trigger queries (active), queries i >= 1 that can see BOS (i < window
    in a windowed layer); the same on the slot, which every query sees."""
    slot, real = split_pattern(pattern, n_slot)
    queries = torch.ones_like(trigger_mask)
    queries[:, 0] = False
    active, dormant = trigger_mask & queries, ~trigger_mask & queries
    sees_bos = queries.clone()
    if window:
        sees_bos[:, window:] = False
    out = {"dormant_bos": masked_head_mean(real[..., 0], dormant & sees_bos),
           "active_bos": masked_head_mean(real[..., 0], active & sees_bos), "dormant_slot": None, "active_slot": None}
    if n_slot:
        on_slot = slot.sum(-1)
        out["dormant_slot"] = masked_head_mean(on_slot, dormant)
        out["active_slot"] = masked_head_mean(on_slot, active)
    return out


def key_mass(pattern, n_slot=0):
    """(T,) attention each real key position j receives from the later queries i > j, mean over those queries
    and the heads (entry 0 is first_token_mass averaged over heads; the last key has no later query: nan)."""
    _, real = split_pattern(pattern, n_slot)
    T = real.size(-1)
    later = torch.ones(T, T, dtype=torch.bool, device=real.device).tril(-1)  # [i, j]: i > j
    return ((real * later).sum(-2) / later.sum(0)).mean(dim=(0, 1))


# ----------------------------------------------------------------------------------------------------
# activations


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
    """(2,) on resid's device: mean |h| at real position 0 and mean over the other real positions, of the vector
    norms of a (B, P, C) tensor: the residual peak for block outputs, the gradient sink for their gradients.
    A tensor, so that callers read all layers' figures in one host sync."""
    norms = resid[:, n_prefix:].norm(dim=-1)
    return torch.stack([norms[:, 0].mean(), norms[:, 1:].mean()])


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


def mean_of(items):
    """Mean of a list of equally shaped tensors (or None when the items are None)."""
    if not items or items[0] is None:
        return None
    return torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in items]).mean(0)


def finite_max(values):
    values = [v for v in values or [] if v is not None and math.isfinite(v)]
    return max(values) if values else None


def finite_mean(values):
    values = [v for v in values or [] if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------------
# outliers (Bondarenko et al. 2023): the infinity norm and the kurtosis of a layer's activations


def moment_sums(x):
    """(count, sum x, sum x^2, sum x^3, sum x^4) over every entry of x, in float64: the sums of several batches
    add up, so the kurtosis of all of them together is exact."""
    x = x.detach().double().flatten()
    count = x.new_full((), x.numel())  # on x's device: stacking a CPU count with CUDA sums raises
    return torch.stack([count, x.sum(), x.pow(2).sum(), x.pow(3).sum(), x.pow(4).sum()])


def excess_kurtosis(sums):
    """E[(x - mean)^4] / Var(x)^2 - 3 from moment_sums (0 for a Gaussian; large when a few entries dwarf the
    rest: one entry of size a among n small ones gives about n - 3)."""
    n, s1, s2, s3, s4 = sums.tolist()  # one host sync
    mean = s1 / n
    m2 = s2 / n - mean ** 2
    m4 = s4 / n - 4 * mean * s3 / n + 6 * mean ** 2 * s2 / n - 3 * mean ** 4
    return m4 / m2 ** 2 - 3.0 if m2 > 0 else float("nan")
