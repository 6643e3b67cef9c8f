"""
Interventions and probes on massive activations and sinks: set / add / scale one entry (L. Dial's bos_token
study), zero vs mean ablation (Sun et al.), the repeated-token probe (Yona et al.), the attribution of a
residual entry to attention, MLP and neurons; and the probe batches they run on.

May import: sinkgpt.common, sinkgpt.loader, sinkgpt.measure, sinkgpt.prep, sinkgpt.stats, sinkgpt.tokenizer.
"""

import torch

from sinkgpt.loader import make_loader
from sinkgpt.measure import AnalyzeError, capture, collect, entry_patch
from sinkgpt.stats import key_mass, slot_mass
from sinkgpt.prep import ensure_prepared
from sinkgpt.tokenizer import describe_tokenizer, load_tokenizer, read_text_argument, tokenizer_identity

DEFAULT_MAX_LENGTH = 1024  # GPT-2's context; SmolLM2's 8192 would need tens of GB of attention patterns
# hook points whose tensors are (B, positions, channels): where one (position, dim) entry can be patched
POSITION_POINTS = ("resid_pre", "ln_1", "attn_out", "resid_mid", "ln_2", "mlp_pre", "mlp_post", "mlp_out",
                   "resid_post")


def probe_batches(target, device, *, data=None, text=None, batches=4, batch_size=8, block_size=0, bos=None,
                  seed=1337):
    """([(x, y)], trigger masks or None, a description of the source) for a LoadedModel: `text` (or FILE:path),
    else the val split of `data`, else of the dataset the target was trained on. Sequences start with BOS as the
    model saw them in training (target.bos) unless `bos` says otherwise; Bigram-Backcopy always starts with BOS."""
    model, meta, cfg = target.model, target.meta, target.config
    # default length: the model's context, at most DEFAULT_MAX_LENGTH (the analysis keeps T x T patterns per head)
    T = min(block_size or DEFAULT_MAX_LENGTH, model.config.block_size)
    bos = target.bos if bos is None else bos
    if text is not None:
        ids = encode_text(meta, text, bos)
        if len(ids) < 2:
            raise AnalyzeError("the text gives fewer than 2 tokens")
        ids = torch.tensor(ids[:T + 1], device=device)[None]
        pairs, source = [(ids[:, :-1], ids[:, 1:])], {"text": text[:200], "bos": bos}
        # a Bigram-Backcopy vocabulary names its triggers: the active-dormant split applies to any text
        triggers = meta.get("triggers")
        masks = [torch.isin(pairs[0][0], torch.tensor(triggers, device=device))] if triggers else None
    else:
        dataset = probe_dataset(target, data)
        loader = make_loader(dataset, "val", batch_size, T, seed=seed, prepend_bos=bos,
                             align_to_docs=bool(cfg.get("align_to_docs")), bb_triggers=cfg.get("bb_triggers", 3),
                             device=device)
        check_tokenizer(dataset, loader.meta, meta)
        pairs = [loader.next_batch() for _ in range(batches)]
        masks = [loader.trigger_mask(x) for x, _ in pairs] if dataset == "bigram_backcopy" else None
        source = {"dataset": dataset, "split": "val", "batches": batches, "batch_size": batch_size,
                  "bos": bos if dataset != "bigram_backcopy" else True}
    check_vocab(max(int(x.max()) for x, _ in pairs), model)
    return pairs, masks, source


def stream_tokens(target, device, *, data=None, text=None, n_tokens=2048, seed=1337):
    """(one long 1-D token sequence, a description) for streaming: the text (BOS first by the BOS rule), else the
    first n_tokens of the val split of `data` or of the target's dataset (documents each led by their BOS), or a
    Bigram-Backcopy sequence of that length."""
    model, meta, cfg = target.model, target.meta, target.config
    if text is not None:
        ids = encode_text(meta, text, target.bos)
        return torch.tensor(ids[:n_tokens], device=device), {"text": text[:200], "tokens": min(len(ids), n_tokens)}
    dataset = probe_dataset(target, data)
    if dataset == "bigram_backcopy":
        loader = make_loader(dataset, "val", 1, n_tokens - 1, seed=seed, bb_triggers=cfg.get("bb_triggers", 3))
        x, y = loader.next_batch()
        ids = torch.cat([x[0], y[0, -1:]])
    else:
        loader = make_loader(dataset, "val", 1, 1, seed=seed)
        check_tokenizer(dataset, loader.meta, meta)
        ids = torch.from_numpy(loader.shards[0][:n_tokens].astype("int64"))
    check_vocab(int(ids.max()), model)
    return ids.to(device), {"dataset": dataset, "split": "val", "tokens": len(ids)}


def encode_text(meta, text, bos, what="text"):
    """The ids of `text` (or FILE:path) in the model's tokenizer, BOS first when `bos`; an error names `what`
    (the flag that gave the text, where a command takes several)."""
    try:
        text = read_text_argument(text, what)
    except ValueError as e:
        raise AnalyzeError(str(e)) from None
    try:
        ids = load_tokenizer(meta).encode(text)
    except ValueError as e:
        raise AnalyzeError(f"{what}: {e}") from None
    return ([meta["bos_token"]] if bos else []) + ids


def probe_dataset(target, data):
    """`data`, else the dataset the target was trained on, else (a pretrained folder, or a model converted from
    one) its default probe data."""
    from_pretrained = target.kind == "pretrained" or "converted_from" in target.config
    dataset = data or target.config.get("dataset") or (default_dataset(target.meta) if from_pretrained else None)
    if dataset is None:
        raise AnalyzeError("the target names no dataset: give --data DATASET or --text TEXT")
    return dataset


def check_tokenizer(dataset, data_meta, model_meta):
    if tokenizer_identity(data_meta) != tokenizer_identity(model_meta):
        raise AnalyzeError(f"dataset {dataset!r} is tokenized with {describe_tokenizer(data_meta)}, but the "
                           f"model uses {describe_tokenizer(model_meta)}")


def check_vocab(biggest, model):
    if biggest >= model.config.vocab_size:
        raise AnalyzeError(f"the data has token id {biggest}, outside the model's vocabulary of "
                           f"{model.config.vocab_size}: wrong dataset for this model?")


def default_dataset(meta):
    """A pretrained model's default probe data: the bundled Shakespeare in its own tokenizer (GPT-2 BPE:
    'shakespeare'; a tokenizer.json: data/shakespeare-<sha>, prepared on first use)."""
    if meta.get("tokenizer") == "hf":
        return ensure_prepared("shakespeare", tokenizer=meta)
    return "shakespeare"


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
