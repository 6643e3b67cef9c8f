"""
Optimizers and interventions on the optimizer state (the tracking of m, v and updates is in sinkgpt.tracking).

    optimizer = build_optimizer(model, cfg, device_type)   # 'adamw' | 'sgd' | 'muon'
    set_lr(optimizer, lr_at(it, cfg), cfg)                 # every iteration, instead of group["lr"] = lr

Parameters fall into five groups; these keys set each one's lr and weight decay:
    embed   token and position embeddings (wte, wpe)          embed_lr_mult, embed_weight_decay
    head    the untied lm_head                                head_lr_mult, head_weight_decay (refused when
                                                              the head is tied: it is wte, an embed parameter)
    sink    dedicated sink parameters (sink_tokens,           sink_lr_mult, sink_weight_decay (default 0)
            sink_logit, k_slot, v_slot, bos_resid,
            the output gate's c_gate)
    matrix  2-D hidden weights (c_attn, c_proj, c_fc)         learning_rate, weight_decay; with
                                                              optimizer='muon': muon_lr, muon_weight_decay
    vector  norm gains, biases and other 1-D parameters       learning_rate, never decayed
The defaults reproduce plain AdamW with one lr and weight decay on every >=2-D non-sink parameter.

Interventions (all off by default, and free when off):
    reset_optimizer / reset_optimizer_at  fresh moments on resume / after the given iterations
    moment_edits   scale, zero or clip m and/or v of parameters chosen by name pattern and slice
    param_decay    extra decoupled weight decay on chosen parameters or slices (e.g. the rows that write a
                   massive activation), on top of their group's
    track_params   log the norms of m, v and the applied update of chosen parameters to metrics.jsonl
Iterations count optimizer steps: an edit or reset 'at' 100 happens right after the 100th step, the same
iter_num train.py logs for that step.

May import: model, sinkgpt.common.
"""

import fnmatch
import math
import re

import torch

from model import is_sink_parameter
from sinkgpt.common import InputError

OPTIM_DEFAULTS = dict(
    embed_lr_mult=1.0,  # lr multipliers: the group's lr is the schedule's lr times its multiplier
    head_lr_mult=1.0,
    sink_lr_mult=1.0,
    embed_weight_decay=-1.0,  # -1 = weight_decay
    head_weight_decay=-1.0,
    sink_weight_decay=0.0,  # decay would pull a sink towards 'off'
    muon_lr=0.02,  # optimizer='muon': lr of the hidden matrices, scaled by the same schedule (lr / learning_rate)
    muon_momentum=0.95,
    muon_ns_steps=5,  # Newton-Schulz iterations
    muon_weight_decay=-1.0,  # -1 = weight_decay (decoupled, like AdamW's)
    reset_optimizer=False,  # init_from='resume': start with fresh optimizer state
    reset_optimizer_at=[],  # iterations after which all optimizer state is dropped
    # dicts, e.g. {"param": "transformer.h.2.mlp.c_proj.weight[447, :]", "moment": "m", "op": "zero", "at": [100]}
    moment_edits=[],
    # dicts {"param": "transformer.h.11.mlp.c_proj.weight[507, :]", "weight_decay": 1.0}: after every step those
    # weights shrink by lr * weight_decay (the lr of their group; at most to zero), on top of the group's own decay
    param_decay=[],
    track_params=[],  # name patterns (optional [slice]) whose m, v and update norms are logged every track_interval
)

OPTIMIZERS = ("adamw", "sgd", "muon")
EMBED_PARAMS = ("transformer.wte.weight", "transformer.wpe.weight")
EDIT_KEYS = {"param", "moment", "op", "value", "at", "every"}
DECAY_KEYS = {"param", "weight_decay"}
MOMENTS = ("m", "v", "both")
EDIT_OPS = ("scale", "zero", "clip")


# ----------------------------------------------------------------------------------------------------
# config


def as_iterations(value):
    """An iteration or a list of them as a set (config keys accept either)."""
    return {value} if isinstance(value, int) else set(value)


def check_iterations(value, where):
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                      for i in items):
        raise ValueError(f"{where} must be an iteration or a list of iterations, got {value!r}")
    if any(i < 1 for i in items):
        raise ValueError(f"{where} must be >= 1 (iterations count optimizer steps), got {value!r}")


def check_edit(edit, where):
    """Structure of one moment edit (which parameters it matches is checked against the model later)."""
    if not isinstance(edit, dict):
        raise ValueError(f"{where} must be a dict, got {edit!r}")
    unknown = set(edit) - EDIT_KEYS
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(EDIT_KEYS)}")
    for key in ("param", "moment", "op"):
        if key not in edit:
            raise ValueError(f"{where} needs '{key}'")
    if not isinstance(edit["param"], str):
        raise ValueError(f"{where}: 'param' must be a string, got {edit['param']!r}")
    parse_param_spec(edit["param"], where)
    if edit["moment"] not in MOMENTS:
        raise ValueError(f"{where}: 'moment' must be one of {', '.join(MOMENTS)}, got {edit['moment']!r}")
    if edit["op"] not in EDIT_OPS:
        raise ValueError(f"{where}: 'op' must be one of {', '.join(EDIT_OPS)}, got {edit['op']!r}")
    if edit["op"] != "zero":
        value = edit.get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{where}: op '{edit['op']}' needs a finite number 'value', got {value!r}")
        if edit["op"] == "clip" and value < 0:
            raise ValueError(f"{where}: a clip bound must be >= 0, got {value}")
        if edit["op"] == "scale" and value < 0 and edit["moment"] != "m":
            raise ValueError(f"{where}: scaling v by {value} < 0 would make it negative")
    if "at" not in edit and "every" not in edit:
        raise ValueError(f"{where} needs 'at' (iterations) and/or 'every' (K)")
    if "at" in edit:
        check_iterations(edit["at"], f"{where}: 'at'")
    if "every" in edit and (not isinstance(edit["every"], int) or isinstance(edit["every"], bool)
                            or edit["every"] < 1):
        raise ValueError(f"{where}: 'every' must be an int >= 1, got {edit['every']!r}")


def check_decay(decay, where):
    """Structure of one param_decay entry."""
    if not isinstance(decay, dict) or set(decay) != DECAY_KEYS:
        raise ValueError(f"{where} must be a dict with exactly the keys {sorted(DECAY_KEYS)}, got {decay!r}")
    if not isinstance(decay["param"], str):
        raise ValueError(f"{where}: 'param' must be a string, got {decay['param']!r}")
    parse_param_spec(decay["param"], where)
    wd = decay["weight_decay"]
    if not isinstance(wd, (int, float)) or isinstance(wd, bool) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"{where}: 'weight_decay' must be a finite number >= 0, got {wd!r}")


def check_optim_config(cfg):
    """Values the type check of the configurator cannot see; raises ValueError with one line naming the key."""
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"config key 'optimizer' must be one of {', '.join(OPTIMIZERS)}, got {cfg['optimizer']!r}")
    for key in ("embed_lr_mult", "head_lr_mult", "sink_lr_mult", "muon_lr"):
        if cfg[key] < 0:
            raise ValueError(f"config key '{key}' must be >= 0, got {cfg[key]}")
    for key in ("embed_weight_decay", "head_weight_decay", "sink_weight_decay", "muon_weight_decay"):
        if cfg[key] < 0 and cfg[key] != -1:
            raise ValueError(f"config key '{key}' must be >= 0, or -1 for weight_decay, got {cfg[key]}")
    for key in ("beta1", "beta2", "muon_momentum"):
        if not 0 <= cfg[key] < 1:
            raise ValueError(f"config key '{key}' must be in [0, 1), got {cfg[key]}")
    if cfg["eps"] <= 0:
        raise ValueError(f"config key 'eps' must be > 0, got {cfg['eps']}")
    if cfg["muon_ns_steps"] < 1:
        raise ValueError(f"config key 'muon_ns_steps' must be >= 1, got {cfg['muon_ns_steps']}")
    check_iterations(cfg["reset_optimizer_at"], "config key 'reset_optimizer_at'")
    if not isinstance(cfg["moment_edits"], list):
        raise ValueError(f"config key 'moment_edits' must be a list of dicts, got {cfg['moment_edits']!r}")
    for i, edit in enumerate(cfg["moment_edits"]):
        check_edit(edit, f"config key 'moment_edits'[{i}]")
    if not isinstance(cfg["param_decay"], list):
        raise ValueError(f"config key 'param_decay' must be a list of dicts, got {cfg['param_decay']!r}")
    for i, decay in enumerate(cfg["param_decay"]):
        check_decay(decay, f"config key 'param_decay'[{i}]")
    if not isinstance(cfg["track_params"], list) or not all(isinstance(p, str) for p in cfg["track_params"]):
        raise ValueError(f"config key 'track_params' must be a list of name patterns, got {cfg['track_params']!r}")
    for spec in cfg["track_params"]:
        parse_param_spec(spec, f"config key 'track_params' entry {spec!r}")
    if cfg["track_params"] and cfg.get("track_interval", 0) <= 0:
        raise ValueError("config key 'track_params' needs track_interval > 0 (how often to log)")


# ----------------------------------------------------------------------------------------------------
# parameter groups and optimizers


def group_of(name, p):
    if is_sink_parameter(name):
        return "sink"
    if name in EMBED_PARAMS:
        return "embed"
    if name.startswith("lm_head."):
        return "head"
    return "matrix" if p.dim() >= 2 else "vector"


def param_groups(model, cfg):
    """The non-empty groups (embed, head, sink, matrix, vector) as optimizer param-group dicts; each carries
    its 'name', 'lr_mult', 'weight_decay', 'params' and 'param_names' (what edits and tracking match)."""
    def decay(key):
        return cfg["weight_decay"] if cfg[key] == -1 else cfg[key]
    # a tied head is the wte matrix itself: named_parameters lists it once, as an embedding, so it follows the
    # embed settings (head_lr_mult and head_weight_decay only act on an untied head)
    settings = {"embed": (cfg["embed_lr_mult"], decay("embed_weight_decay")),
                "head": (cfg["head_lr_mult"], decay("head_weight_decay")),
                "sink": (cfg["sink_lr_mult"], decay("sink_weight_decay")),
                "matrix": (1.0, decay("muon_weight_decay") if cfg["optimizer"] == "muon" else cfg["weight_decay"]),
                "vector": (1.0, 0.0)}
    groups = {name: {"name": name, "lr_mult": lr_mult, "weight_decay": wd, "params": [], "param_names": []}
              for name, (lr_mult, wd) in settings.items()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = groups[group_of(name, p)]
            group["params"].append(p)
            group["param_names"].append(name)
    if not groups["head"]["params"] and (cfg["head_lr_mult"] != 1.0 or cfg["head_weight_decay"] != -1.0):
        raise InputError("config keys head_lr_mult and head_weight_decay act on an untied head, but this model's "
                         "head is its token embedding (tie_embeddings): use embed_lr_mult / embed_weight_decay")
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model, cfg, device_type):
    """AdamW, SGD with momentum, or Muon for the hidden matrices plus AdamW for everything else."""
    groups = param_groups(model, cfg)
    for group in groups:
        group["lr"] = cfg["learning_rate"] * group["lr_mult"]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=cfg["learning_rate"], momentum=cfg["momentum"])
    use_muon = cfg["optimizer"] == "muon"
    muon_groups = [g for g in groups if use_muon and g["name"] == "matrix"]
    adamw_groups = [g for g in groups if not (use_muon and g["name"] == "matrix")]
    fused = {"fused": True} if device_type in ("cuda", "cpu") else {}
    adamw = torch.optim.AdamW(adamw_groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                              eps=cfg["eps"], **fused)
    if not muon_groups:
        return adamw
    for group in muon_groups:
        group["lr"] = cfg["muon_lr"] * group["lr_mult"]
        group["muon"] = True  # set_lr: this group's base lr is muon_lr
    muon = Muon(muon_groups, lr=cfg["muon_lr"], momentum=cfg["muon_momentum"], ns_steps=cfg["muon_ns_steps"])
    return CombinedOptimizer(muon=muon, adamw=adamw)


def set_lr(optimizer, lr, cfg):
    """Set every group's lr for this iteration: lr * lr_mult, and for Muon groups muon_lr times the schedule's
    factor lr / learning_rate (so warmup and decay act on both alike)."""
    for group in optimizer.param_groups:
        if group.get("muon"):
            factor = lr / cfg["learning_rate"] if cfg["learning_rate"] else 0.0
            group["lr"] = cfg["muon_lr"] * factor * group.get("lr_mult", 1.0)
        else:
            group["lr"] = lr * group.get("lr_mult", 1.0)


def sub_optimizers(optimizer):
    return list(optimizer.optimizers.values()) if isinstance(optimizer, CombinedOptimizer) else [optimizer]


def reset_optimizer_state(optimizer):
    """Drop all per-parameter state (moments, momentum buffers, step counts); hyperparameters stay."""
    for opt in sub_optimizers(optimizer):
        opt.state.clear()


def group_names(optimizer_state):
    """The group names of an optimizer state_dict (a CombinedOptimizer's nests one per part)."""
    if "param_groups" in optimizer_state:
        return [g.get("name") for g in optimizer_state["param_groups"]]
    return [name for part in optimizer_state.values() if isinstance(part, dict) for name in group_names(part)]


def load_optimizer_state(optimizer, optimizer_state):
    """optimizer.load_state_dict, with a readable error when the checkpoint's groups differ from this run's,
    and this run's hyperparameters (lr multipliers, weight decay, betas, ...) kept: the config wins on resume,
    so an intervention can change them."""
    saved, current = group_names(optimizer_state), [g["name"] for g in optimizer.param_groups]
    if saved != current:
        raise ValueError(f"the checkpoint's optimizer state has groups {saved} but this run's optimizer has "
                         f"{current}; resume with reset_optimizer=True to start the optimizer afresh")
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)


# ----------------------------------------------------------------------------------------------------
# Muon


def newton_schulz(G, steps=5):
    """An approximate orthogonalisation of the 2-D matrix G (U V^T of its SVD): a quintic iteration whose
    coefficients are tuned for speed rather than exactness, so the singular values end roughly in [0.5, 1.5].
    Runs in bfloat16 on CUDA and in float32 elsewhere (bfloat16 matmuls are slow on CPUs)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.T
    X = X / (X.norm() + 1e-7)  # spectral norm <= Frobenius norm = 1, inside the iteration's basin
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


def muon_update(grad, buf, momentum, nesterov, ns_steps):
    """Update the momentum buffer in place and return the orthogonalised step direction (before -lr)."""
    buf.lerp_(grad, 1 - momentum)
    direction = grad.lerp(buf, momentum) if nesterov else buf
    update = newton_schulz(direction, ns_steps)
    # orthogonal matrices have RMS 1/sqrt(cols) per entry; tall matrices get the same RMS as wide ones
    return update * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov) whose update is orthogonalised by Newton-Schulz, for 2-D hidden weight matrices.
    State per parameter: 'momentum_buffer' (the first moment m). Weight decay is decoupled: p *= 1 - lr * wd."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                update = muon_update(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                                     group["ns_steps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


class CombinedOptimizer:
    """Several torch optimizers used as one (Muon for the hidden matrices, AdamW for the rest): the
    param_groups, state, step, zero_grad and state_dict that train.py and GradScaler use."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # a property: load_state_dict replaces the group dicts of the parts
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self):
        """A merged view of the per-parameter state (the inner dicts are the parts' own, so edits act)."""
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict):
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"optimizer state has parts {sorted(state_dict)}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


# ----------------------------------------------------------------------------------------------------
# selecting parameters (and slices of them) by name

INT_RE = re.compile(r"^-?\d+$")
SLICE_RE = re.compile(r"^(-?\d+)?:(-?\d+)?(?::(\d+)?)?$")


def parse_index(text, where):
    """'447, :' -> (447, slice(None)): integers and start:stop:step ranges only (no eval)."""
    index = []
    for part in text.replace(" ", "").split(","):
        if INT_RE.match(part):
            index.append(int(part))
            continue
        m = SLICE_RE.match(part)
        if not m:
            raise ValueError(f"{where}: bad slice [{text}] (use integers and start:stop ranges, e.g. [447, :])")
        start, stop, step = (None if s is None else int(s) for s in m.groups())
        if step == 0:
            raise ValueError(f"{where}: slice step 0 in [{text}]")
        index.append(slice(start, stop, step))
    return tuple(index)


def parse_param_spec(spec, where):
    """'pattern[slice]' -> (fnmatch pattern, index tuple or None, key text). A trailing [...] is always a
    slice (parameter names never end in ']'); fnmatch classes elsewhere in the pattern are fine."""
    spec = spec.strip()
    if spec.endswith("]") and "[" in spec:
        cut = spec.rindex("[")
        pattern, text = spec[:cut], spec[cut + 1:-1]
        index = parse_index(text, where)
        return pattern, index, pattern + "[" + text.replace(" ", "") + "]"
    return spec, None, spec


def check_index(index, shape, where):
    if len(index) > len(shape):
        raise ValueError(f"{where}: {len(index)} indices for a parameter of shape {tuple(shape)}")
    for i, n in zip(index, shape):
        if isinstance(i, int) and not -n <= i < n:
            raise ValueError(f"{where}: index {i} out of range for a dimension of size {n} (shape {tuple(shape)})")
        if isinstance(i, slice):
            if any(b is not None and not -n <= b <= n for b in (i.start, i.stop)) or not len(range(*i.indices(n))):
                raise ValueError(f"{where}: slice {i.start}:{i.stop} is out of range or empty for a dimension of "
                                 f"size {n} (shape {tuple(shape)})")


def select_params(model, optimizer, spec, where):
    """[(key, param, index)] for every optimized parameter whose name matches spec's pattern. Aliases count
    (a tied lm_head.weight matches wte); each parameter appears once, under its first name."""
    pattern, index, key_text = parse_param_spec(spec, where)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    matches, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in optimized and id(p) not in seen and fnmatch.fnmatchcase(name, pattern):
            seen.add(id(p))
            if index is not None:
                check_index(index, p.shape, where)
            key = name if index is None else name + key_text[len(pattern):]
            matches.append((key, p, index))
    if not matches:
        raise ValueError(f"{where}: pattern {pattern!r} matches no optimized parameter")
    return matches


def param_group(optimizer, p):
    """The optimizer's parameter group that holds p."""
    return next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))


def moment_keys(optimizer, p):
    """(first-moment state key, second-moment state key or None) of parameter p in this optimizer."""
    group = param_group(optimizer, p)
    if "betas" in group:  # Adam / AdamW
        return "exp_avg", "exp_avg_sq"
    if group.get("muon"):
        return "momentum_buffer", None
    if group.get("momentum", 0) == 0:  # SGD without momentum keeps no state
        return None, None
    return "momentum_buffer", None


# ----------------------------------------------------------------------------------------------------
# moment edits


class MomentEditor:
    """The interventions on the optimizer, applied right after each optimizer step: the moment_edits (scale,
    zero or clip m and/or v of chosen parameters), the resets of reset_optimizer_at and the extra decay of
    param_decay (the weights themselves shrink by lr * weight_decay, lr being their group's at this step).

        editor = MomentEditor(raw_model, optimizer, cfg["moment_edits"], cfg["reset_optimizer_at"],
                              cfg["param_decay"])
        editor.apply(iter_num)   # iter_num = optimizer steps taken so far

    Every edit is checked against the model at construction: a pattern that matches nothing, an index out of
    range, or 'v' on a parameter without a second moment (Muon, SGD) raises ValueError naming the edit."""

    def __init__(self, model, optimizer, edits, reset_at=(), decays=()):
        self.optimizer = optimizer
        self.reset_at = as_iterations(reset_at)
        self.decays = []  # (weight_decay, param group, param, index)
        for i, decay in enumerate(decays):
            where = f"param_decay[{i}] ({decay.get('param')!r})" if isinstance(decay, dict) else f"param_decay[{i}]"
            check_decay(decay, where)
            for _, p, index in select_params(model, optimizer, decay["param"], where):
                self.decays.append((float(decay["weight_decay"]), param_group(optimizer, p), p, index))
        self.edits = []  # (op, value, at iterations, every, [(param, state key, index)])
        for i, edit in enumerate(edits):
            where = f"moment_edits[{i}] ({edit.get('param')!r})" if isinstance(edit, dict) else f"moment_edits[{i}]"
            check_edit(edit, where)
            wanted = {"m": (0,), "v": (1,), "both": (0, 1)}[edit["moment"]]
            targets = []
            for key, p, index in select_params(model, optimizer, edit["param"], where):
                keys = [moment_keys(optimizer, p)[j] for j in wanted]
                if edit["moment"] != "both" and keys[0] is None:
                    which = "first" if edit["moment"] == "m" else "second"
                    raise ValueError(f"{where}: {key} has no {which} moment in this optimizer")
                targets += [(p, k, index) for k in keys if k is not None]  # 'both' edits what exists
            self.edits.append((edit["op"], float(edit.get("value", 0.0)), as_iterations(edit.get("at", [])),
                               edit.get("every", 0), targets))

    @torch.no_grad()
    def apply(self, iter_num):
        state = self.optimizer.state if self.edits else {}
        for op, value, at, every, targets in self.edits:
            if iter_num not in at and not (every > 0 and iter_num % every == 0):
                continue
            for p, key, index in targets:
                moment = state.get(p, {}).get(key)
                if moment is None:  # no state yet (or just reset): nothing to edit
                    continue
                view = moment if index is None else moment[index]  # basic indexing: a view, edited in place
                if op == "zero":
                    view.zero_()
                elif op == "scale":
                    view.mul_(value)
                else:
                    view.clamp_(-value, value)
        if iter_num in self.reset_at:
            reset_optimizer_state(self.optimizer)
        for weight_decay, group, p, index in self.decays:  # lr x weight_decay >= 1 zeroes the weights, no further
            (p if index is None else p[index]).mul_(max(0.0, 1.0 - group["lr"] * weight_decay))
