"""
Tracking during training: massive-activation and sink statistics on a fixed probe batch, and the norms of the
optimizer's moments and updates on chosen parameters, as 'track_*' / 'opt_*' keys for metrics.jsonl. train.py
builds a Tracker only when track_interval > 0: with tracking off this module is never imported and training
runs hook-free.

May import: sinkgpt.common, sinkgpt.measure, sinkgpt.optim, sinkgpt.stats.
"""

import math

import torch

from sinkgpt.common import plain
from sinkgpt.measure import collect, residual_grads
from sinkgpt.optim import moment_keys, select_params
from sinkgpt.stats import position_norms, safe_ratio


class Tracker:
    """What train.py tracks, as one object: activation and sink statistics every track_interval iterations,
    and, with track_params, the optimizer's m, v and update norms of those parameters on the same iterations.

        tracker = Tracker(raw_model, optimizer, cfg, val_loader, start_iter)
        train_step(..., before_update=tracker.before_update)   # snapshots the tracked parameters when due
        record = tracker.after_step(iter_num)                   # None, or the 'track_*' / 'opt_*' keys
        tracker.start_record()                                  # before the first step of a new run
    """

    def __init__(self, model, optimizer, cfg, val_loader, start_iter=0):
        self.interval = cfg["track_interval"]
        self.activations = ActivationTracker(model, cfg, val_loader)
        self.optimizer = OptimizerTracker(model, optimizer, cfg["track_params"]) if cfg["track_params"] else None
        self.next_iter = start_iter + 1  # the iteration the next optimizer step completes

    def start_record(self):
        """The activation record of the model before its first step (no optimizer state exists yet)."""
        return self.activations.measure()

    def due(self, iter_num):
        return iter_num % self.interval == 0

    def before_update(self):
        """Called between clipping and the optimizer step: the update is measured as after - before."""
        if self.optimizer is not None and self.due(self.next_iter):
            self.optimizer.snapshot()

    def after_step(self, iter_num):
        """The record for metrics.jsonl when iter_num is a tracking iteration, else None. m and v are measured as
        the next step will use them (after this iteration's moment edits and resets)."""
        self.next_iter = iter_num + 1
        if not self.due(iter_num):
            return None
        record = self.activations.measure()
        if self.optimizer is not None:
            record.update(self.optimizer.measure())
        return record


class ActivationTracker:
    """Massive-activation and sink statistics on a fixed probe batch, for metrics.jsonl during training.

        tracker = ActivationTracker(raw_model, cfg, val_loader)
        record = tracker.measure()   # flat dict of JSON values ('track_*' keys)

    The probe batch is drawn once from the val loader, whose state is restored so evaluation is unchanged.
    measure() runs in eval mode, its hooks live for its own forward passes, and it never touches .grad."""

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
            model.train(was_training)
        return plain(tracking_record(stats, grads, model.n_prefix))


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
        # outliers (Bondarenko et al.): excess kurtosis of each block output, max |x| and kurtosis of attention
        "track_kurtosis": per_layer("resid_kurtosis"), "track_attn_max_abs": per_layer("attn_max_abs"),
        "track_attn_kurtosis": per_layer("attn_kurtosis"),
    }
    if layers[0]["sink_token_top"] is not None:
        record["track_sink_token_top1"] = [e["sink_token_top"][0][0] for e in layers]
    if grads is not None:  # gradient sinks: the gradient on position 0 against the other positions
        norms = torch.stack([position_norms(g.float(), n_prefix) for g in grads]).tolist()  # one host sync
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


class OptimizerTracker:
    """Norms of m, v and the applied update of selected parameters (or slices), for metrics.jsonl.

        tracker = OptimizerTracker(raw_model, optimizer, cfg["track_params"])
        tracker.snapshot()          # before optimizer.step(), on tracking iterations only
        optimizer.step()
        record = tracker.measure()  # {'opt_param_norm/<name>': .., 'opt_m_norm/<name>': .., 'opt_v_norm/<name>': ..,
                                    #  'opt_update_norm/<name>': ..}

    The snapshot copies only the tracked parameters (or slices); v is absent where the optimizer keeps none. A
    single weight (e.g. 'transformer.h.11.mlp.c_proj.weight[507, 1229]') also gets its signed m and update
    ('opt_m/<name>', 'opt_update/<name>'): whether the step moves it towards a larger or a smaller entry."""

    def __init__(self, model, optimizer, patterns):
        self.optimizer = optimizer
        self.targets = []  # (key, param, index, first-moment key, second-moment key)
        seen = set()
        for spec in patterns:
            for key, p, index in select_params(model, optimizer, spec, f"track_params entry {spec!r}"):
                if key not in seen:
                    seen.add(key)
                    self.targets.append((key, p, index, *moment_keys(optimizer, p)))
        self.before = None

    @staticmethod
    def view(t, index):
        return t if index is None else t[index]

    @torch.no_grad()
    def snapshot(self):
        self.before = [self.view(p, index).detach().clone() for _, p, index, _, _ in self.targets]

    @torch.no_grad()
    def measure(self):
        state = self.optimizer.state
        keys, figures = [], []  # norms, and the signed m and update of single weights
        for i, (key, p, index, m_key, v_key) in enumerate(self.targets):
            scalar = self.view(p, index).numel() == 1  # one weight: its signed m and update say which way it goes
            keys.append(f"opt_param_norm/{key}")  # the weights themselves: do removed writers grow back?
            figures.append(self.view(p, index).float().norm())
            for prefix, state_key in (("opt_m", m_key), ("opt_v", v_key)):
                moment = state.get(p, {}).get(state_key) if state_key else None
                if moment is not None:
                    keys.append(f"{prefix}_norm/{key}")
                    figures.append(self.view(moment, index).float().norm())
                    if scalar and prefix == "opt_m":
                        keys.append(f"opt_m/{key}")
                        figures.append(self.view(moment, index).float().sum())
            if self.before is not None:
                update = self.view(p, index).float() - self.before[i].float()
                keys.append(f"opt_update_norm/{key}")
                figures.append(update.norm())
                if scalar:
                    keys.append(f"opt_update/{key}")
                    figures.append(update.sum())
        self.before = None
        values = torch.stack(figures).tolist() if figures else []  # one host sync for all of them
        return {k: v if math.isfinite(v) else None for k, v in zip(keys, values)}
