"""optim.py: parameter groups, AdamW / SGD / Muon, lr multipliers, and the interventions on the optimizer state
(reset, moment edits, tracking), each checked by reading the optimizer state after real steps."""
import io
import math

import pytest
import torch

from model import GPT, GPTConfig
from sinkgpt.common import InputError
from sinkgpt.config import DEFAULTS
from sinkgpt.optim import (OPTIM_DEFAULTS, CombinedOptimizer, MomentEditor, Muon, build_optimizer, check_optim_config,
                           load_optimizer_state, newton_schulz, param_groups, reset_optimizer_state, set_lr)
from sinkgpt.tracking import OptimizerTracker

C_PROJ = "transformer.h.0.mlp.c_proj.weight"  # (n_embd, 4 n_embd) = (32, 128)


def make_cfg(**overrides):
    cfg = {**DEFAULTS, **OPTIM_DEFAULTS, "learning_rate": 1e-2, "weight_decay": 0.1}
    cfg.update(overrides)
    return cfg


def tiny_model(seed=0, **options):
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=48, dropout=0.0)
    args.update(options)
    return GPT(GPTConfig(**args))


def batch(seed=0, vocab=48):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (4, 16), generator=g), torch.randint(0, vocab, (4, 16), generator=g)


def train_steps(model, optimizer, cfg, n, first_seed=0):
    for it in range(first_seed, first_seed + n):
        x, y = batch(it)
        set_lr(optimizer, cfg["learning_rate"] * (0.5 + 0.1 * it), cfg)  # a changing schedule
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def legacy_optimizer(model, cfg):
    """train.build_optimizer as it was before optim.py (kept here so the comparison survives the switch), with
    the output gate among the sink parameters (no decay), where it has belonged since."""
    def is_sink(name):
        return any(part in name for part in ("sink_logit", "k_slot", "v_slot", "bos_resid", "sink_tokens", "c_gate"))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and not is_sink(name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
                             fused=True)


def params_by_decay(optimizer):
    out = {}
    for g in optimizer.param_groups:
        out.setdefault(g["weight_decay"], set()).update(id(p) for p in g["params"])
    return out


def group(optimizer, name):
    return next(g for g in optimizer.param_groups if g.get("name") == name)


# ------------------------------------------------------------------------------------------------
# defaults reproduce the previous optimizer


@pytest.mark.parametrize("options", [{}, {"sink": "kv_bias", "tie_embeddings": False},
                                     {"sink": "token", "attn_gate": "headwise"}, {"sink": "bos_override"}])
def test_default_groups_and_steps_match_the_previous_optimizer(options):
    cfg = make_cfg()
    model, reference = tiny_model(**options), tiny_model(**options)
    optimizer, legacy = build_optimizer(model, cfg, "cpu"), legacy_optimizer(reference, cfg)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    ref_ids = {id(p): i for i, p in enumerate(reference.parameters())}
    assert ({wd: {ids[i] for i in s} for wd, s in params_by_decay(optimizer).items()}
            == {wd: {ref_ids[i] for i in s} for wd, s in params_by_decay(legacy).items()})
    train_steps(model, optimizer, cfg, 3)
    for i in range(3):  # the legacy loop: one lr for every group
        x, y = batch(i)
        for g in legacy.param_groups:
            g["lr"] = cfg["learning_rate"] * (0.5 + 0.1 * i)
        reference(x, y)[1].backward()
        legacy.step()
        legacy.zero_grad(set_to_none=True)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------------
# groups, lr multipliers, weight decay


def test_groups_multipliers_and_weight_decay():
    cfg = make_cfg(embed_lr_mult=2.0, head_lr_mult=3.0, sink_lr_mult=5.0, embed_weight_decay=0.0,
                   head_weight_decay=0.3, sink_weight_decay=0.01)
    model = tiny_model(sink="logit", attn_gate="elementwise", tie_embeddings=False)
    optimizer = build_optimizer(model, cfg, "cpu")
    names = {g["name"]: set(g["param_names"]) for g in optimizer.param_groups}
    assert names["embed"] == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert names["head"] == {"lm_head.weight"}
    assert names["sink"] == {f"transformer.h.{i}.attn.{p}" for i in range(2)
                             for p in ("sink_logit", "c_gate.weight", "c_gate.bias")}  # the gate: sink_lr_mult
    assert "transformer.h.0.ln_1.weight" in names["vector"] and C_PROJ in names["matrix"]
    for g in optimizer.param_groups:  # names and params line up
        lookup = dict(model.named_parameters())
        assert all(lookup[n] is p for n, p in zip(g["param_names"], g["params"]))
    expected = {"embed": (2.0, 0.0), "head": (3.0, 0.3), "sink": (5.0, 0.01), "matrix": (1.0, 0.1),
                "vector": (1.0, 0.0)}
    set_lr(optimizer, 4e-3, cfg)
    for g in optimizer.param_groups:
        mult, wd = expected[g["name"]]
        assert g["lr"] == 4e-3 * mult and g["weight_decay"] == wd, g["name"]


def test_tied_head_follows_the_embed_settings_and_refuses_head_keys():
    cfg = make_cfg(embed_lr_mult=2.0)
    groups = param_groups(tiny_model(), cfg)
    assert [g["name"] for g in groups] == ["embed", "matrix", "vector"]
    assert "transformer.wte.weight" in groups[0]["param_names"] and groups[0]["lr_mult"] == 2.0
    assert groups[0]["weight_decay"] == cfg["weight_decay"]  # embed_weight_decay=-1: weight_decay
    for key, value in (("head_lr_mult", 7.0), ("head_weight_decay", 0.5)):  # they would act on nothing
        with pytest.raises(InputError, match="act on an untied head"):
            param_groups(tiny_model(), make_cfg(**{key: value}))


def test_muon_lr_follows_the_schedule_and_adamw_lr_the_multipliers():
    cfg = make_cfg(optimizer="muon", muon_lr=0.05, embed_lr_mult=0.5, learning_rate=1e-3)
    optimizer = build_optimizer(tiny_model(), cfg, "cpu")
    set_lr(optimizer, 2.5e-4, cfg)  # a quarter of the peak
    assert group(optimizer, "matrix")["lr"] == pytest.approx(0.05 / 4, rel=1e-12)
    assert group(optimizer, "embed")["lr"] == 2.5e-4 * 0.5 and group(optimizer, "vector")["lr"] == 2.5e-4


# ------------------------------------------------------------------------------------------------
# Muon


def test_newton_schulz_singular_values_in_band():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96), (384, 128)]:  # the aspect ratios of c_attn, c_fc, c_proj
        G = torch.randn(shape)
        s = torch.linalg.svdvals(newton_schulz(G, steps=5))
        assert s.min() > 0.5 and s.max() < 1.5, (shape, s.min().item(), s.max().item())
        assert torch.linalg.svdvals(G).max() > 5  # the input was far from orthogonal
    # a square Gaussian matrix has near-zero singular values that 5 steps cannot lift (the iteration maps each
    # singular value on its own, keeping the singular vectors): every direction above 5% of the top one is in band
    G = torch.randn(128, 128)
    U, S, Vh = torch.linalg.svd(G)
    mapped = torch.diagonal(U.T @ newton_schulz(G, steps=5) @ Vh.T)
    kept = S > 0.05 * S[0]
    assert kept.sum() > 100 and mapped[kept].min() > 0.5 and mapped.max() < 1.5


def test_muon_update_is_the_scaled_newton_schulz_of_nesterov_momentum():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32))  # tall: scale sqrt(64 / 32)
    opt = Muon([p], lr=0.1, momentum=0.9, ns_steps=5)
    g1, g2 = torch.randn(64, 32), torch.randn(64, 32)
    p.grad = g1.clone()
    opt.step()
    before = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    buf = 0.1 * g1 * 0.9 + 0.1 * g2  # m = lerp(m, g, 1 - beta), from m = 0
    nesterov = g2 + 0.9 * (buf - g2)
    update = p.detach() - before
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)
    torch.testing.assert_close(update, -0.1 * math.sqrt(2) * newton_schulz(nesterov, 5), rtol=1e-4, atol=1e-6)
    s = torch.linalg.svdvals(update / (0.1 * math.sqrt(2)))
    assert 0.5 < s.min() and s.max() < 1.5
    assert torch.equal(p.grad, g2)  # the gradient itself is left alone


def test_muon_takes_only_hidden_matrices():
    cfg = make_cfg(optimizer="muon")
    model = tiny_model(sink="kv_bias", tie_embeddings=False, attn_gate="headwise")
    optimizer = build_optimizer(model, cfg, "cpu")
    assert isinstance(optimizer, CombinedOptimizer)
    muon, adamw = optimizer.optimizers["muon"], optimizer.optimizers["adamw"]
    muon_names = {n for g in muon.param_groups for n in g["param_names"]}
    adamw_names = {n for g in adamw.param_groups for n in g["param_names"]}
    hidden = {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")
              and any(k in n for k in ("c_attn", "c_proj", "c_fc"))}  # the gate is a sink parameter: AdamW
    assert muon_names == hidden
    assert adamw_names == {n for n, _ in model.named_parameters()} - hidden
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.k_slot"} <= adamw_names
    train_steps(model, optimizer, cfg, 2)
    assert all(set(optimizer.state[p]) == {"momentum_buffer"} for g in muon.param_groups for p in g["params"])
    assert all("exp_avg_sq" in optimizer.state[p] for g in adamw.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


@pytest.mark.parametrize("kind", ["muon", "adamw", "sgd"])
def test_state_dict_round_trip_continues_identically(kind):
    cfg = make_cfg(optimizer=kind)
    model_a, model_b = tiny_model(), tiny_model()
    opt_a = build_optimizer(model_a, cfg, "cpu")
    train_steps(model_a, opt_a, cfg, 5)  # uninterrupted
    opt_b = build_optimizer(model_b, cfg, "cpu")
    train_steps(model_b, opt_b, cfg, 2)
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optimizer": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain types and tensors only
    model_c = tiny_model(seed=1)
    model_c.load_state_dict(checkpoint["model"])
    opt_c = build_optimizer(model_c, cfg, "cpu")
    load_optimizer_state(opt_c, checkpoint["optimizer"])
    train_steps(model_c, opt_c, cfg, 3, first_seed=2)
    for (name, p), q in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(p, q), name


def test_load_keeps_this_runs_hyperparameters_and_rejects_other_groups():
    cfg = make_cfg()
    model = tiny_model()
    optimizer = build_optimizer(model, cfg, "cpu")
    train_steps(model, optimizer, cfg, 1)
    state = optimizer.state_dict()
    changed = build_optimizer(model, make_cfg(embed_weight_decay=0.0), "cpu")
    load_optimizer_state(changed, state)
    assert group(changed, "embed")["weight_decay"] == 0.0 and len(changed.state) == len(optimizer.state)
    with pytest.raises(ValueError, match="reset_optimizer"):
        load_optimizer_state(build_optimizer(model, make_cfg(optimizer="muon"), "cpu"), state)
    with pytest.raises(ValueError, match="reset_optimizer"):
        load_optimizer_state(optimizer, legacy_optimizer(model, cfg).state_dict())


def test_grad_scaler_drives_the_combined_optimizer():
    cfg = make_cfg(optimizer="muon")
    model_a, model_b = tiny_model(), tiny_model()
    opt_a, opt_b = build_optimizer(model_a, cfg, "cpu"), build_optimizer(model_b, cfg, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batch()
    scaler.scale(model_a(x, y)[1]).backward()
    scaler.unscale_(opt_a)
    torch.nn.utils.clip_grad_norm_(model_a.parameters(), 1.0)
    scaler.step(opt_a)
    scaler.update()
    model_b(x, y)[1].backward()
    torch.nn.utils.clip_grad_norm_(model_b.parameters(), 1.0)
    opt_b.step()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# reset


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_reset_clears_moments_and_step_counts(kind):
    cfg = make_cfg(optimizer=kind)
    model = tiny_model()
    optimizer = build_optimizer(model, cfg, "cpu")
    train_steps(model, optimizer, cfg, 3)
    wte = model.transformer.wte.weight
    assert optimizer.state[wte]["step"].item() == 3 and optimizer.state[wte]["exp_avg"].abs().sum() > 0
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    reset_optimizer_state(optimizer)
    assert len(optimizer.state) == 0
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == hyper
    x, y = batch(7)
    model(x, y)[1].backward()
    optimizer.step()
    assert optimizer.state[wte]["step"].item() == 1  # fresh bias correction
    # fresh moments: m is one gradient's share, (1 - beta1) g, nothing of the three earlier steps
    torch.testing.assert_close(optimizer.state[wte]["exp_avg"], (1 - cfg["beta1"]) * wte.grad)


# ------------------------------------------------------------------------------------------------
# moment edits


def stepped(kind="adamw", steps=2, **options):
    cfg = make_cfg(optimizer=kind, **options)
    model = tiny_model()
    optimizer = build_optimizer(model, cfg, "cpu")
    train_steps(model, optimizer, cfg, steps)
    return model, optimizer, cfg


def test_zero_first_moment_of_a_row_slice():
    model, optimizer, cfg = stepped()
    p = dict(model.named_parameters())[C_PROJ]
    m_before, v_before = optimizer.state[p]["exp_avg"].clone(), optimizer.state[p]["exp_avg_sq"].clone()
    editor = MomentEditor(model, optimizer, [{"param": C_PROJ + "[7, :]", "moment": "m", "op": "zero", "at": [2]}])
    editor.apply(2)
    m = optimizer.state[p]["exp_avg"]
    assert m_before[7].abs().sum() > 0 and torch.equal(m[7], torch.zeros(128))
    rest = torch.ones(32, dtype=torch.bool)
    rest[7] = False
    assert torch.equal(m[rest], m_before[rest]) and torch.equal(optimizer.state[p]["exp_avg_sq"], v_before)


def test_zeroed_moments_are_rebuilt_from_the_next_gradient_only():
    """An edit acts on what the optimizer uses next: the zeroed row of m and v holds one gradient's share after
    the following step, the other rows keep their history."""
    model, optimizer, cfg = stepped()
    p = dict(model.named_parameters())[C_PROJ]
    editor = MomentEditor(model, optimizer, [{"param": C_PROJ + "[3]", "moment": "both", "op": "zero", "at": 2}])
    editor.apply(2)
    assert optimizer.state[p]["exp_avg"][3].abs().max() == 0 and optimizer.state[p]["exp_avg_sq"][3].max() == 0
    x, y = batch(2)
    model(x, y)[1].backward()
    g = p.grad.clone()
    optimizer.step()
    m, v = optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]
    torch.testing.assert_close(m[3], (1 - cfg["beta1"]) * g[3])
    torch.testing.assert_close(v[3], (1 - cfg["beta2"]) * g[3] ** 2)
    assert not torch.allclose(m[4], (1 - cfg["beta1"]) * g[4])


def test_scale_second_moment_by_half_and_clip_first_moment():
    model, optimizer, cfg = stepped()
    p = dict(model.named_parameters())["transformer.h.1.attn.c_attn.weight"]
    v_before, m_before = optimizer.state[p]["exp_avg_sq"].clone(), optimizer.state[p]["exp_avg"].clone()
    bound = m_before.abs().max().item() / 4
    MomentEditor(model, optimizer, [
        {"param": "transformer.h.1.attn.c_attn.*", "moment": "v", "op": "scale", "value": 0.5, "every": 1},
        {"param": "transformer.h.1.attn.c_attn.weight", "moment": "m", "op": "clip", "value": bound, "at": [2]},
    ]).apply(2)
    assert torch.equal(optimizer.state[p]["exp_avg_sq"], v_before * 0.5)
    m = optimizer.state[p]["exp_avg"]
    assert m.abs().max() <= bound
    inside = m_before.abs() <= bound
    assert torch.equal(m[inside], m_before[inside]) and (~inside).any()
    bias = dict(model.named_parameters())["transformer.h.1.attn.c_attn.bias"]  # matched by the pattern too
    assert optimizer.state[bias]["exp_avg_sq"].abs().sum() > 0


def test_every_and_at_schedules():
    model, optimizer, cfg = stepped()
    p = dict(model.named_parameters())[C_PROJ]
    editor = MomentEditor(model, optimizer, [
        {"param": C_PROJ + "[0]", "moment": "m", "op": "zero", "every": 3},
        {"param": C_PROJ + "[1]", "moment": "m", "op": "zero", "at": [2, 5]},
    ])
    m = optimizer.state[p]["exp_avg"]
    for it in range(1, 10):
        m.fill_(1.0)
        editor.apply(it)
        assert (m[0].abs().max() == 0) == (it % 3 == 0), it
        assert (m[1].abs().max() == 0) == (it in (2, 5)), it
        assert m[2:].min() == 1.0


def test_edits_reach_muon_and_sgd_momentum_buffers():
    for kind in ("muon", "sgd"):
        model, optimizer, cfg = stepped(kind)
        p = dict(model.named_parameters())[C_PROJ]
        before = optimizer.state[p]["momentum_buffer"].clone()
        MomentEditor(model, optimizer, [{"param": C_PROJ + "[:, 4:8]", "moment": "both", "op": "scale",
                                         "value": 0.25, "at": 2}]).apply(2)
        after = optimizer.state[p]["momentum_buffer"]
        assert torch.equal(after[:, 4:8], before[:, 4:8] * 0.25) and torch.equal(after[:, :4], before[:, :4])
        with pytest.raises(ValueError, match="no second moment"):
            MomentEditor(model, optimizer, [{"param": C_PROJ, "moment": "v", "op": "zero", "at": 1}])


def test_tied_head_alias_and_empty_editor():
    model, optimizer, cfg = stepped()
    wte = model.transformer.wte.weight
    editor = MomentEditor(model, optimizer, [{"param": "lm_head.weight[-1]", "moment": "m", "op": "zero", "at": 2}])
    editor.apply(2)
    assert optimizer.state[wte]["exp_avg"][-1].abs().max() == 0
    state = {k: v.clone() for k, v in optimizer.state[wte].items()}
    empty = MomentEditor(model, optimizer, [])
    assert empty.edits == []
    empty.apply(2)
    assert all(torch.equal(state[k], optimizer.state[wte][k]) for k in state)


def test_param_decay_shrinks_only_its_slice_by_the_groups_lr():
    """param_decay: after the step the chosen row is multiplied by 1 - lr * weight_decay, lr being its group's
    lr at that step (here the scheduled lr); every other weight is untouched."""
    model, optimizer, cfg = stepped()
    p = dict(model.named_parameters())[C_PROJ]
    editor = MomentEditor(model, optimizer, [], decays=[{"param": C_PROJ + "[5, :]", "weight_decay": 10.0}])
    set_lr(optimizer, 0.02, cfg)  # the lr of the step just taken, set after the editor was built
    before = p.detach().clone()
    editor.apply(3)
    assert torch.equal(p[5], before[5] * (1 - 0.02 * 10.0))
    rest = torch.ones(32, dtype=torch.bool)
    rest[5] = False
    assert torch.equal(p[rest], before[rest])
    set_lr(optimizer, 0.5, cfg)  # lr x weight_decay >= 1: the row goes to zero, not through it
    editor.apply(4)
    assert torch.equal(p[5], torch.zeros_like(p[5])) and torch.equal(p[rest], before[rest])
    with pytest.raises(ValueError, match=r"param_decay\[0\].*weight_decay"):
        MomentEditor(model, optimizer, [], decays=[{"param": C_PROJ, "weight_decay": -1.0}])
    with pytest.raises(ValueError, match=r"param_decay\[0\].*matches no"):
        MomentEditor(model, optimizer, [], decays=[{"param": "transformer.h.9.*", "weight_decay": 1.0}])


@pytest.mark.parametrize("edit, message", [
    ({"param": "transformer.h.9.*", "moment": "m", "op": "zero", "at": 1}, "transformer.h.9"),
    ({"param": C_PROJ + "[32, :]", "moment": "m", "op": "zero", "at": 1}, "out of range"),
    ({"param": C_PROJ + "[0:40]", "moment": "m", "op": "zero", "at": 1}, "out of range"),
    ({"param": C_PROJ + "[1, 2, 3]", "moment": "m", "op": "zero", "at": 1}, "3 indices"),
    ({"param": C_PROJ + "[__import__('os')]", "moment": "m", "op": "zero", "at": 1}, "bad slice"),
    ({"param": C_PROJ, "moment": "m", "op": "scale", "at": 1}, "value"),
    ({"param": C_PROJ, "moment": "x", "op": "zero", "at": 1}, "moment"),
    ({"param": C_PROJ, "moment": "m", "op": "zero"}, "every"),
    ({"param": C_PROJ, "moment": "m", "op": "zero", "at": 1, "evry": 2}, "evry"),
])
def test_bad_edits_raise_naming_the_edit(edit, message):
    model, optimizer, cfg = stepped(steps=1)
    with pytest.raises(ValueError, match=r"moment_edits\[1\]") as info:
        MomentEditor(model, optimizer, [{"param": C_PROJ, "moment": "m", "op": "zero", "at": 1}, edit])
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------------
# tracking


def test_tracking_norms_match_a_hand_computed_adamw_step():
    cfg = make_cfg()
    model = tiny_model()
    optimizer = build_optimizer(model, cfg, "cpu")
    tracker = OptimizerTracker(model, optimizer, [C_PROJ, "transformer.h.1.mlp.c_fc.weight[2:5, :]"])
    p = dict(model.named_parameters())[C_PROJ]
    before = p.detach().clone()
    x, y = batch()
    set_lr(optimizer, cfg["learning_rate"], cfg)
    model(x, y)[1].backward()
    g = p.grad.clone()
    tracker.snapshot()
    optimizer.step()
    record = tracker.measure()
    b1, b2, lr, wd, eps = cfg["beta1"], cfg["beta2"], cfg["learning_rate"], cfg["weight_decay"], cfg["eps"]
    m, v = (1 - b1) * g, (1 - b2) * g * g
    after = before * (1 - lr * wd) - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    assert record[f"opt_m_norm/{C_PROJ}"] == pytest.approx(m.norm().item(), rel=1e-5)
    assert record[f"opt_v_norm/{C_PROJ}"] == pytest.approx(v.norm().item(), rel=1e-5)
    assert record[f"opt_update_norm/{C_PROJ}"] == pytest.approx((after - before).norm().item(), rel=1e-4)
    key = "transformer.h.1.mlp.c_fc.weight[2:5,:]"
    fc_m = optimizer.state[dict(model.named_parameters())["transformer.h.1.mlp.c_fc.weight"]]["exp_avg"]
    assert record[f"opt_m_norm/{key}"] == pytest.approx(fc_m[2:5].norm().item(), rel=1e-6)
    assert record[f"opt_param_norm/{key}"] == pytest.approx(
        dict(model.named_parameters())["transformer.h.1.mlp.c_fc.weight"][2:5].norm().item(), rel=1e-6)
    assert set(record) == {f"{s}/{k}" for s in ("opt_param_norm", "opt_m_norm", "opt_v_norm", "opt_update_norm")
                           for k in (C_PROJ, key)}
    assert all(math.isfinite(v) and v > 0 for v in record.values())
    assert "opt_update_norm/" + C_PROJ not in tracker.measure()  # no snapshot, no update norm


def test_tracking_a_single_weight_logs_its_signed_moment_and_update():
    """One weight (both indices given) is logged signed too: opt_m/<key> is m itself, opt_update/<key> is the
    change the step made, so a curve shows whether the step pushes the weight (and the entry it writes) up."""
    cfg = make_cfg()
    model = tiny_model()
    optimizer = build_optimizer(model, cfg, "cpu")
    key = C_PROJ + "[3,7]"
    tracker = OptimizerTracker(model, optimizer, [C_PROJ + "[3, 7]"])
    p = dict(model.named_parameters())[C_PROJ]
    x, y = batch()
    set_lr(optimizer, cfg["learning_rate"], cfg)
    model(x, y)[1].backward()
    before = p[3, 7].item()
    tracker.snapshot()
    optimizer.step()
    record = tracker.measure()
    m = optimizer.state[p]["exp_avg"][3, 7].item()
    assert record[f"opt_m/{key}"] == pytest.approx(m, rel=1e-6) and m != 0
    assert record[f"opt_update/{key}"] == pytest.approx(p[3, 7].item() - before, rel=1e-5)
    assert record[f"opt_m_norm/{key}"] == pytest.approx(abs(m), rel=1e-6)
    assert (record[f"opt_update/{key}"] < 0) == (m > 0)  # Adam steps against its first moment


def test_tracking_under_muon_has_no_second_moment():
    model, optimizer, cfg = stepped("muon", steps=1)
    record = OptimizerTracker(model, optimizer, ["transformer.h.0.*c_fc.*"]).measure()
    assert set(record) == {"opt_m_norm/transformer.h.0.mlp.c_fc.weight", "opt_m_norm/transformer.h.0.mlp.c_fc.bias",
                           "opt_v_norm/transformer.h.0.mlp.c_fc.bias", "opt_param_norm/transformer.h.0.mlp.c_fc.weight",
                           "opt_param_norm/transformer.h.0.mlp.c_fc.bias"}


# ------------------------------------------------------------------------------------------------
# config checks


def test_default_config_is_valid_and_bad_values_name_the_key():
    check_optim_config(make_cfg())
    check_optim_config(make_cfg(optimizer="muon", reset_optimizer_at=[10, 20], track_interval=5,
                                track_params=[C_PROJ + "[447, :]"],
                                moment_edits=[{"param": C_PROJ, "moment": "v", "op": "clip", "value": 1.0,
                                               "every": 10}]))
    bad = [({"optimizer": "lion"}, "'optimizer'"), ({"embed_lr_mult": -1.0}, "'embed_lr_mult'"),
           ({"head_weight_decay": -0.5}, "'head_weight_decay'"), ({"reset_optimizer_at": [0]}, "reset_optimizer_at"),
           ({"reset_optimizer_at": ["10"]}, "reset_optimizer_at"), ({"muon_ns_steps": 0}, "muon_ns_steps"),
           ({"moment_edits": [{"param": "x", "moment": "m", "op": "shrink", "at": 1}]}, "moment_edits"),
           ({"moment_edits": [{"param": "x", "moment": "v", "op": "scale", "value": -1.0, "at": 1}]}, "negative"),
           ({"param_decay": [{"param": "x", "weight_decay": "1"}]}, "param_decay"),
           ({"param_decay": [{"param": "x"}]}, "param_decay"),
           ({"track_params": ["x[1:]"]}, "track_interval"), ({"track_params": ["x[a]"], "track_interval": 1}, "bad")]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            check_optim_config(make_cfg(**overrides))
