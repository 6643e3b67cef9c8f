"""model.py: GPT-2 initialisation, generation (cache, sampling), the scoped analysis hooks, and the architecture
ablation flags."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import idx_batch, randomize, tiny
from model import MLP, GPTConfig, RMSNorm, sample_next
from sinkgpt.generation import decode_layout


# ------------------------------------------------------------------------------------------------
# GPT-2 initialisation


def test_gpt2_initialisation_statistics():
    n_layer = 4
    model = tiny(n_layer=n_layer, n_head=4, n_embd=256, block_size=64, vocab_size=512, seed=1)
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif "ln_" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            expected = proj_std if name.endswith("c_proj.weight") else 0.02
            # std of n >= 16k draws: relative standard error <= 0.6%
            assert abs(p.std().item() / expected - 1) < 0.05, (name, p.std().item(), expected)
            assert abs(p.mean().item()) < 4 * expected / math.sqrt(p.numel()), name
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert len([n for n, _ in model.named_parameters() if "c_proj.weight" in n]) == 2 * n_layer


def test_sink_parameters_initialisation():
    model = tiny(n_layer=2, n_head=8, n_embd=512, vocab_size=64, sink="kv_bias", attn_gate="headwise", seed=2)
    for block in model.transformer.h:
        attn = block.attn
        for p in (attn.k_slot, attn.v_slot):
            assert p.shape == (8, 64) and abs(p.std().item() / 0.02 - 1) < 0.1
        assert abs(attn.c_gate.weight.std().item() / 0.02 - 1) < 0.05 and torch.equal(attn.c_gate.bias,
                                                                                        torch.zeros(8))
    model = tiny(n_layer=3, n_embd=512, n_head=8, sink="token", n_sink_tokens=8, seed=3)
    assert model.sink_tokens.shape == (8, 512) and abs(model.sink_tokens.std().item() / 0.02 - 1) < 0.05
    model = tiny(n_layer=3, sink="logit")
    assert all(torch.equal(b.attn.sink_logit, torch.zeros(2)) for b in model.transformer.h)
    model = tiny(n_layer=3, sink="bos_override")
    assert all(torch.equal(b.bos_resid, torch.zeros(32)) for b in model.transformer.h)
    assert not hasattr(tiny(sink="softmax1").transformer.h[0].attn, "k_slot")  # softmax1 has no parameter


def test_initial_loss_is_near_uniform():
    model = tiny(vocab_size=65)
    idx, targets = idx_batch(model, B=8, T=16, seed=1), idx_batch(model, B=8, T=16, seed=2)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.05


# ------------------------------------------------------------------------------------------------
# generation

GEN_CONFIGS = [dict(), dict(sink="token"), dict(sink="token", n_sink_tokens=3), dict(sink="logit"),
               dict(sink="softmax1"), dict(sink="kv_bias"), dict(sink="k_bias"), dict(sink="bos_override"),
               dict(attn_gate="headwise"), dict(attn_gate="elementwise", sink="kv_bias"), dict(attn_fn="sigmoid"),
               dict(attn_fn="relu", sink="kv_bias"), dict(pos_emb="rope"), dict(pos_emb="rope", sink="token"),
               dict(pos_emb="none", qk_norm=True), dict(norm_pos="post", norm="rmsnorm", mlp_act="swiglu")]


@pytest.mark.parametrize("options", GEN_CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_greedy_generation_is_the_same_with_and_without_cache(options):
    # float64 so that a near-tie cannot flip an argmax between the two paths; 30 new tokens > block_size 16
    model = randomize(tiny(**options)).double().eval()
    prompt = idx_batch(model, B=2, T=5)
    prompt[0, 0] = model.config.bos_token
    with decode_layout(model):  # the cached path as sample.py runs it on a CPU (row-block products)
        with_cache = model.generate(prompt, 30, temperature=0, use_cache=True)
    without = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 35)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    # and both equal the argmax of a plain forward on the (cropped) context, step by step
    idx = prompt
    for _ in range(30):
        logits, _ = model(idx[:, -16:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(idx, with_cache)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = randomize(tiny(), scale=0.1).eval()
    prompt = idx_batch(model, B=3, T=4)

    def draw(seed, **kw):
        return model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(draw(7, use_cache=False), draw(7, use_cache=True))


def test_top_k_1_and_tiny_top_p_and_tiny_temperature_are_greedy():
    model = randomize(tiny()).double().eval()
    prompt = idx_batch(model, B=2, T=4)
    greedy = model.generate(prompt, 15, temperature=0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 15, temperature=1.5, top_k=1, generator=gen), greedy)
    assert torch.equal(model.generate(prompt, 15, temperature=1.5, top_p=1e-6, generator=gen), greedy)
    assert torch.equal(model.generate(prompt, 15, temperature=1e-6, generator=gen), greedy)
    # and sampling at temperature 1 is not greedy here
    assert not torch.equal(model.generate(prompt, 15, temperature=1.0, generator=gen), greedy)


def test_sample_next_follows_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    n = 40000
    for temperature in (0.5, 1.0, 2.0):
        gen = torch.Generator().manual_seed(int(temperature * 10))
        draws = sample_next(logits.expand(n, -1), temperature=temperature, generator=gen).squeeze(1)
        freq = torch.bincount(draws, minlength=5).double() / n
        p = torch.softmax(logits[0].double() / temperature, -1)
        sigma = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (temperature, freq, p)


def test_sample_next_top_k_and_top_p_restrict_the_support():
    # not sorted, so that mapping the sorted order back to token ids is tested
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0]])
    n = 5000
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(n, -1), top_k=2, generator=gen).squeeze(1)
    assert set(draws.tolist()) == {2, 4}
    p = torch.softmax(logits[0], -1)
    top_p = (p[2] + p[4] + 0.5 * p[0]).item()  # the smallest set reaching it is {2, 4, 0}
    draws = sample_next(logits.expand(n, -1), top_p=top_p, generator=gen).squeeze(1)
    assert set(draws.tolist()) == {0, 2, 4}
    # the kept tokens keep their relative probabilities
    freq = torch.bincount(draws, minlength=5).double() / n
    keep = torch.tensor([0, 2, 4])
    q = p[keep].double() / p[keep].sum()
    assert ((freq[keep] - q).abs() <= 5 * (q * (1 - q) / n).sqrt()).all()
    # rows are independent: a batch of different logits gets each row's own support
    rows = torch.stack([logits[0], logits[0].flip(0)])
    draws = sample_next(rows.repeat(500, 1), top_k=1, generator=gen).view(500, 2)
    assert (draws[:, 0] == 2).all() and (draws[:, 1] == 2).all()
    draws = sample_next(torch.stack([logits[0], logits[0].roll(1)]).repeat(500, 1), top_p=1e-3,
                        generator=gen).view(500, 2)
    assert (draws[:, 0] == 2).all() and (draws[:, 1] == 3).all()


# ------------------------------------------------------------------------------------------------
# analysis hooks


def expected_hook_shapes(model, B, T):
    cfg = model.config
    C, H, D = cfg.n_embd, cfg.n_head, cfg.head_size
    n = model.n_prefix
    Tn = T + n
    hidden = 4 * C if cfg.mlp_act != "swiglu" else (8 * C // 3 + 63) // 64 * 64
    shapes = {"embed": (B, T, C), "ln_f": (B, Tn, C)}
    for layer in range(cfg.n_layer):
        shapes.update({f"h.{layer}.{p}": (B, Tn, C) for p in ("resid_pre", "ln_1", "attn_z", "attn_out", "resid_mid",
                                                               "ln_2", "mlp_out", "resid_post")})
        shapes[f"h.{layer}.q"] = (B, H, Tn, D)
        shapes[f"h.{layer}.z"], shapes[f"h.{layer}.head_out"] = (B, Tn, H, D), (B, Tn, H, C)
        shapes.update({f"h.{layer}.{p}": (B, cfg.kv_heads, Tn, D) for p in ("k", "v")})
        cols = Tn + (1 if cfg.sink in ("logit", "softmax1", "kv_bias", "k_bias") else 0)
        shapes.update({f"h.{layer}.{p}": (B, H, Tn, cols) for p in ("scores", "pattern")})
        shapes[f"h.{layer}.mlp_pre"] = (B, Tn, 2 * hidden if cfg.mlp_act == "swiglu" else hidden)
        shapes[f"h.{layer}.mlp_post"] = (B, Tn, hidden)
    return shapes


def no_hooks_left(model):
    return not model.hook_fns and all(not block.hook_fns for block in model.transformer.h)


@pytest.mark.parametrize("options", [dict(), dict(sink="token", n_sink_tokens=2), dict(sink="kv_bias"),
                                     dict(mlp_act="swiglu", norm_pos="post"), dict(n_head=4, n_kv_head=2)],
                         ids=["plain", "token", "kv_bias", "swiglu-post", "gqa"])
def test_every_hook_point_reads_the_right_shape_and_costs_nothing(options):
    model = randomize(tiny(**options)).double().eval()
    idx = idx_batch(model, B=2, T=7)
    with torch.no_grad():
        plain, _ = model(idx)
    names = model.hook_names()
    expected = expected_hook_shapes(model, 2, 7)
    assert sorted(names) == sorted(expected)
    with torch.no_grad():
        hooked, _, cache = model.run_with_cache(idx, names)
    assert {name: tuple(t.shape) for name, t in cache.items()} == expected
    # reading hooks change nothing (the scores hooks switch to the eager path: equal to float64 rounding)
    assert (hooked - plain).abs().max().item() < 1e-12
    assert no_hooks_left(model)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], plain)


def test_every_hook_point_is_documented_with_its_shape():
    from model import GLOBAL_HOOK_POINTS, HOOK_POINTS
    for table in (GLOBAL_HOOK_POINTS, HOOK_POINTS):
        for point, text in table.items():
            assert text.startswith("(B, ") and ")" in text, point
    assert sorted(tiny().hook_names()) == sorted(list(GLOBAL_HOOK_POINTS) + [f"h.{layer}.{point}" for layer in range(2)
                                                                           for point in HOOK_POINTS])


def test_reading_hooks_are_free_and_hooks_are_removed_on_exit():
    model = randomize(tiny(), seed=4).eval()
    fresh = tiny()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    idx = idx_batch(model)
    with torch.no_grad():
        reference, _ = fresh(idx)
        with model.hooks({name: (lambda x: None) for name in ("embed", "h.0.resid_post", "h.1.mlp_post", "ln_f")}):
            assert torch.equal(model(idx)[0], reference)  # not attention: the same fused path
        with model.hooks({"h.0.attn_out": lambda x: torch.zeros_like(x)}):
            assert not torch.allclose(model(idx)[0], reference)
        assert no_hooks_left(model)
        assert torch.equal(model(idx)[0], reference)


def test_hooks_nest_refuse_a_second_hook_on_one_point_and_leave_on_errors():
    model = randomize(tiny(), seed=4).double().eval()
    idx = idx_batch(model)

    def zero(x):
        return torch.zeros_like(x)

    with torch.no_grad():
        reference, _ = model(idx)
        with model.hooks({"h.0.attn_out": zero}):
            patched, _ = model(idx)
            with model.hooks({"h.1.mlp_out": zero}):  # nested: both hooks act
                both, _ = model(idx)
                assert not torch.equal(both, patched)
            assert torch.equal(model(idx)[0], patched)  # the inner block removed its own hook only
            with pytest.raises(ValueError, match="h.0.attn_out"):  # a clash is an error, not a silent replace
                with model.hooks({"h.1.resid_post": lambda x: None, "h.0.attn_out": lambda x: None}):
                    pass
            assert model.transformer.h[1].hook_fns == {}  # what the refused block had placed is gone too
            assert torch.equal(model(idx)[0], patched)
        assert no_hooks_left(model) and torch.equal(model(idx)[0], reference)
        with pytest.raises(RuntimeError, match="inside"):
            with model.hooks({"h.0.resid_post": zero, "ln_f": zero}):
                raise RuntimeError("an error inside the block")
        assert no_hooks_left(model)


def test_patching_hooks_replace_the_activation():
    model = randomize(tiny()).double().eval()
    idx = idx_batch(model)
    with torch.no_grad():
        # the last block's output zeroed: every position's logits are lm_head(ln_f(0)) = lm_head(ln_f.bias)
        with model.hooks({"h.1.resid_post": lambda x: torch.zeros_like(x)}):
            logits, _ = model(idx)
        expected = model.transformer.ln_f.bias @ model.lm_head.weight.T
        torch.testing.assert_close(logits, expected.expand_as(logits), rtol=0, atol=1e-12)
        # a uniform causal pattern in layer 0 equals the attention output averaging the values
        captured = {}
        uniform = {"h.0.v": lambda v: captured.setdefault("v", v),
                   "h.0.pattern": lambda p: torch.ones_like(p).tril() / torch.arange(1, p.size(-1) + 1,
                                                                                      dtype=p.dtype)[:, None],
                   "h.0.attn_out": lambda x: captured.setdefault("out", x)}
        with model.hooks(uniform):
            model(idx)
    v = captured["v"]  # (B, H, T, D)
    mean_v = v.cumsum(2) / torch.arange(1, v.size(2) + 1, dtype=v.dtype)[:, None]
    attn = model.transformer.h[0].attn
    y = mean_v.transpose(1, 2).reshape(2, 12, 32) @ attn.c_proj.weight.T + attn.c_proj.bias
    torch.testing.assert_close(captured["out"], y, rtol=0, atol=1e-12)


PATTERN_OPTIONS = [dict(), dict(sink="logit"), dict(sink="softmax1"), dict(sink="kv_bias"), dict(sink="k_bias"),
                   dict(sink="token", n_sink_tokens=2), dict(attn_fn="sigmoid"), dict(attn_fn="sigmoid", sink="kv_bias"),
                   dict(attn_fn="relu"), dict(attn_fn="relu", sink="kv_bias"), dict(pos_emb="rope", qk_norm=True),
                   dict(n_head=4, n_kv_head=2, sink="kv_bias"), dict(n_head=4, n_kv_head=1, sink="logit"),
                   dict(n_head=4, n_kv_head=2, attn_fn="relu", sink="kv_bias")]


@pytest.mark.parametrize("options", PATTERN_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_scores_and_pattern_hooks_follow_the_formulas(options):
    """scores = q.k / sqrt(D) where visible (-inf elsewhere) with the slot as column 0; pattern = softmax(scores),
    sigmoid(scores) unnormalised, or relu(scores) / the number of visible keys (the slot counted); and the
    attention output is c_proj(pattern @ values) with the slot's value first."""
    model = randomize(tiny(**options)).double().eval()
    idx = idx_batch(model, B=2, T=7)
    names = [f"h.1.{p}" for p in ("q", "k", "v", "scores", "pattern", "attn_z", "attn_out")]
    with torch.no_grad():
        _, _, cache = model.run_with_cache(idx, names)
    q, k, v, scores, pattern, z, out = (cache[name] for name in names)
    attn = model.transformer.h[1].attn
    B, H, P, D = q.shape
    group = H // k.size(1)  # grouped-query attention: query head h reads key/value head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    n_slot = 1 if model.config.sink in ("logit", "softmax1", "kv_bias", "k_bias") else 0
    assert scores.shape == pattern.shape == (B, H, P, n_slot + P)
    visible = torch.ones(P, P, dtype=torch.bool).tril()
    real = scores[..., n_slot:]
    torch.testing.assert_close(real[..., visible], (q @ k.transpose(-2, -1) / math.sqrt(D))[..., visible],
                               rtol=0, atol=1e-12)
    assert (real[..., ~visible] == float("-inf")).all()
    zero_slot = torch.zeros(H // group, D, dtype=q.dtype)
    k_slot = getattr(attn, "k_slot", zero_slot).repeat_interleave(group, dim=0)
    v_slot = getattr(attn, "v_slot", zero_slot).repeat_interleave(group, dim=0)
    if model.config.sink == "logit":
        torch.testing.assert_close(scores[..., 0], attn.sink_logit.view(1, H, 1).expand(B, H, P), rtol=0, atol=0)
    elif n_slot:
        torch.testing.assert_close(scores[..., 0], (q * k_slot[None, :, None]).sum(-1) / math.sqrt(D),
                                   rtol=0, atol=1e-12)
    n_visible = (torch.arange(P) + 1 + n_slot).to(q.dtype)[:, None]  # keys each query sees, the slot included
    expected = {"softmax": lambda s: torch.softmax(s, -1), "sigmoid": torch.sigmoid,
                "relu": lambda s: torch.relu(s) / n_visible}[model.config.attn_fn](scores)
    torch.testing.assert_close(pattern, expected, rtol=0, atol=1e-12)
    if model.config.attn_fn == "sigmoid":  # unnormalised: rows do not sum to one
        assert (pattern.sum(-1) - 1).abs().max() > 1e-3
    values = torch.cat([v_slot.view(1, H, 1, D).expand(B, -1, -1, -1), v], dim=2) if n_slot else v
    y = (pattern @ values).transpose(1, 2).reshape(B, P, H * D)
    torch.testing.assert_close(z, y, rtol=0, atol=1e-12)  # c_proj's input
    torch.testing.assert_close(out, y @ attn.c_proj.weight.T + attn.c_proj.bias, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["bogus", "h.2.q", "h.0.nope", "h.x.q", "h.0", "blocks.0.q"])
def test_unknown_hook_names_raise_keyerror_listing_the_valid_ones(name):
    model = tiny()
    with pytest.raises(KeyError) as info:
        with model.hooks({name: lambda x: None}):
            pass
    message = str(info.value)
    assert name in message
    for valid in ("embed", "ln_f", "resid_post", "pattern", "mlp_pre"):
        assert valid in message
    assert no_hooks_left(model)


# ------------------------------------------------------------------------------------------------
# architecture ablations


def test_rope_scores_depend_only_on_relative_position():
    model = randomize(tiny(pos_emb="rope", block_size=32)).double().eval()
    assert not hasattr(model.transformer, "wpe")
    with torch.no_grad():
        s = model.run_with_cache(torch.full((1, 20), 5), ["h.0.scores"])[2]["h.0.scores"][0]
    # (H, T, T); identical tokens: q_i . k_j depends on i - j only
    for i in range(20):  # (to the float32 rounding of the model's rotary tables)
        for j in range(i + 1):
            torch.testing.assert_close(s[:, i, j], s[:, i - j, 0], rtol=0, atol=1e-6)
    assert (s[:, 1:, 0] - s[:, 1:, 1:].diagonal(dim1=1, dim2=2)).abs().max() > 1e-3  # the offset matters
    # learned positions do not have the property
    learned = randomize(tiny(block_size=32)).double().eval()
    with torch.no_grad():
        s = learned.run_with_cache(torch.full((1, 20), 5), ["h.0.scores"])[2]["h.0.scores"][0]
    assert (s[:, 5, 3] - s[:, 2, 0]).abs().max() > 1e-3


def test_no_position_embedding_makes_a_repeated_token_position_blind():
    model = randomize(tiny(pos_emb="none")).double().eval()
    assert not hasattr(model.transformer, "wpe") and not hasattr(model, "rope_cos")
    with torch.no_grad():
        logits, _ = model(torch.full((1, 10), 3))
    torch.testing.assert_close(logits[0], logits[0, :1].expand(10, -1), rtol=0, atol=1e-12)
    with torch.no_grad():
        logits, _ = randomize(tiny()).double().eval()(torch.full((1, 10), 3))
    assert (logits[0] - logits[0, :1]).abs().max() > 1e-3


def test_rmsnorm_normalises_to_unit_rms_without_centering():
    model = randomize(tiny(norm="rmsnorm")).double().eval()
    for module in (model.transformer.ln_f, *(m for b in model.transformer.h for m in (b.ln_1, b.ln_2))):
        assert isinstance(module, RMSNorm) and not hasattr(module, "bias")
        with torch.no_grad():
            module.weight.fill_(1.0)
    with torch.no_grad():
        cache = model.run_with_cache(idx_batch(model), ["h.0.ln_1", "h.0.resid_pre"])[2]
    ln, x = cache["h.0.ln_1"], cache["h.0.resid_pre"]
    torch.testing.assert_close(ln, x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt(), rtol=0, atol=1e-12)
    assert ln.mean(-1).abs().max() > 1e-3  # not centred


def test_post_norm_block_output_is_normalised():
    model = randomize(tiny(norm_pos="post")).double().eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
    points = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    with torch.no_grad():
        cache = model.run_with_cache(idx_batch(model), [f"h.1.{point}" for point in points])[2]
    captured = {point: cache[f"h.1.{point}"] for point in points}

    def ln(x):
        return F.layer_norm(x, (x.size(-1),), eps=1e-5)

    out = captured["resid_post"]
    assert out.mean(-1).abs().max() < 1e-10
    torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones_like(out[..., 0]), rtol=0, atol=1e-3)
    torch.testing.assert_close(captured["resid_mid"], ln(captured["resid_pre"] + captured["attn_out"]),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(out, ln(captured["resid_mid"] + captured["mlp_out"]), rtol=0, atol=1e-12)
    # pre-norm (the default) does not normalise the residual stream
    pre = randomize(tiny()).double().eval()
    with torch.no_grad():
        pre_out = pre.run_with_cache(idx_batch(pre), ["h.1.resid_post"])[2]["h.1.resid_post"]
    assert (pre_out.std(-1, unbiased=False) - 1).abs().max() > 0.05


def test_qk_norm_gives_unit_rms_queries_and_keys():
    model = randomize(tiny(qk_norm=True)).double().eval()
    attn = model.transformer.h[0].attn
    assert attn.q_norm.weight.shape == (16,)
    with torch.no_grad():
        attn.q_norm.weight.fill_(1.0)
        attn.k_norm.weight.fill_(1.0)
    with torch.no_grad():
        captured = model.run_with_cache(idx_batch(model), ["h.0.q", "h.0.k"])[2]
    for t in captured.values():
        rms = t.pow(2).mean(-1).sqrt()
        assert ((rms - 1).abs() < 1e-3).all()
    assert not hasattr(tiny().transformer.h[0].attn, "q_norm")


@pytest.mark.parametrize("act", ["gelu", "gelu_exact", "relu", "relu2", "swiglu"])
def test_mlp_activations(act):
    model = randomize(tiny(mlp_act=act, n_embd=48, n_head=2)).double().eval()
    mlp = model.transformer.h[0].mlp
    hidden = (8 * 48 // 3 + 63) // 64 * 64 if act == "swiglu" else 4 * 48
    assert mlp.c_fc.weight.shape == ((2 if act == "swiglu" else 1) * hidden, 48)
    assert mlp.c_proj.weight.shape == (48, hidden)
    if act == "swiglu":
        assert hidden == 128  # 8/3 * 48 = 128: a multiple of 64 already
    with torch.no_grad():
        cache = model.run_with_cache(idx_batch(model), ["h.0.mlp_pre", "h.0.mlp_post"])[2]
    pre, post = cache["h.0.mlp_pre"], cache["h.0.mlp_post"]
    expected = {"gelu": lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))),
                "gelu_exact": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
                "relu": lambda h: h.clamp(min=0),
                "relu2": lambda h: h.clamp(min=0) ** 2,
                "swiglu": lambda h: h[..., :hidden] * torch.sigmoid(h[..., :hidden]) * h[..., hidden:]}[act](pre)
    torch.testing.assert_close(post, expected, rtol=0, atol=1e-12)


def test_swiglu_keeps_the_parameter_count_of_a_4x_mlp_roughly():
    cfg = GPTConfig(n_layer=1, n_head=4, n_embd=192, vocab_size=10, block_size=8)
    gelu = sum(p.numel() for p in MLP(cfg).parameters())
    cfg.mlp_act = "swiglu"
    swiglu = sum(p.numel() for p in MLP(cfg).parameters())
    assert abs(swiglu / gelu - 1) < 0.05


def test_untied_head_has_its_own_storage():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 37 * 32
    with torch.no_grad():
        untied.lm_head.weight.zero_()
    assert untied.transformer.wte.weight.abs().sum() > 0
    logits, _ = untied(idx_batch(untied))
    assert torch.equal(logits, torch.zeros_like(logits))


def test_logit_softcap_bounds_the_logits():
    cap = 2.0
    capped = randomize(tiny(logit_softcap=cap), scale=1.0).double().eval()
    raw = tiny()
    raw.double().load_state_dict(capped.state_dict())
    raw.eval()
    idx = idx_batch(capped)
    with torch.no_grad():
        y, _ = capped(idx)
        x, _ = raw(idx)
    assert x.abs().max() > 3 * cap  # the raw logits do exceed the cap
    assert y.abs().max() <= cap
    torch.testing.assert_close(y, cap * torch.tanh(x / cap), rtol=0, atol=1e-12)


def test_pad_vocab_keeps_logits_of_vocab_size():
    model = tiny(pad_vocab=True, vocab_size=37)
    assert model.config.padded_vocab_size == 64
    assert model.transformer.wte.weight.shape == (64, 32) and model.lm_head.weight.shape == (64, 32)
    idx = idx_batch(model)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 12, 37)
    assert torch.isfinite(loss)
    # the padding rows never receive probability mass or gradient
    loss.backward()
    assert torch.equal(model.transformer.wte.weight.grad[37:], torch.zeros(27, 32))


def test_config_rejects_invalid_options():
    for bad in (dict(sink="bogus"), dict(attn_gate="gate"), dict(attn_fn="tanh"), dict(pos_emb="alibi"),
                dict(norm="batchnorm"), dict(norm_pos="middle"), dict(mlp_act="tanh"), dict(n_head=3),
                dict(n_sink_tokens=0)):
        with pytest.raises(ValueError):
            tiny(**bad)
    with pytest.raises(ValueError, match="even"):
        tiny(pos_emb="rope", n_embd=30, n_head=2)
    for bad, key in ((dict(rotary_pct=0.0, pos_emb="rope"), "rotary_pct"), (dict(rotary_pct=1.5, pos_emb="rope"),
                     "rotary_pct"), (dict(rotary_pct=0.5), "rotary_pct"), (dict(pos_emb="rope", rotary_pct=0.2), "even"),
                     (dict(parallel_residual=True, norm_pos="post"), "parallel_residual")):
        with pytest.raises(ValueError, match=key) as info:
            tiny(**bad)
        assert "\n" not in str(info.value)


def test_forward_refuses_sequences_longer_than_block_size():
    model = tiny(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_crop_block_size_keeps_the_first_positions():
    model = randomize(tiny(block_size=16)).double().eval()
    idx = idx_batch(model, T=8)
    with torch.no_grad():
        before, _ = model(idx)
        model.crop_block_size(8)
        after, _ = model(idx)
    assert model.transformer.wpe.weight.shape == (8, 32)
    assert torch.equal(before, after)
