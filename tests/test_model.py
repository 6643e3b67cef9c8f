"""model.py: Hugging Face GPT-2 loading/export, GPT-2 initialisation, generation (cache, sampling), analysis
hooks, and the architecture ablation flags."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import HF_BOS, HF_VOCAB, random_gpt2
from model import GPT, MLP, GPTConfig, Linear, RMSNorm, sample_next


def tiny(seed=0, **options):
    kwargs = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=37, bos_token=36)
    kwargs.update(options)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**kwargs))


def randomize(model, seed=0, scale=0.3):
    """Non-trivial weights everywhere (biases, norms and sink parameters included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if name.endswith("weight") and ("ln_" in name or "_norm" in name):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(scale * noise)
    return model


def idx_batch(model, B=2, T=12, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


# ------------------------------------------------------------------------------------------------
# Hugging Face GPT-2: load and export


def hf_input():
    idx = torch.randint(0, HF_VOCAB, (3, 32), generator=torch.Generator().manual_seed(5))
    idx[:, 0] = HF_BOS
    return idx


def test_from_pretrained_safetensors_matches_transformers(hf_dir, hf_gpt2):
    model = GPT.from_pretrained(hf_dir).eval()
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (2, 4, 64, HF_VOCAB, 32)
    assert cfg.bos_token == HF_BOS and cfg.tie_embeddings
    idx = hf_input()
    with torch.no_grad():
        logits, _ = model(idx)
    expected = hf_logits(hf_gpt2, idx)
    assert logits.shape == expected.shape == (3, 32, HF_VOCAB)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_from_pretrained_pytorch_bin_matches_transformers(tmp_path, hf_gpt2):
    # transformers 5 always writes safetensors: write the legacy format by hand
    hf_gpt2.config.to_json_file(str(tmp_path / "config.json"))
    torch.save(hf_gpt2.state_dict(), str(tmp_path / "pytorch_model.bin"))
    assert not (tmp_path / "model.safetensors").exists()
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = hf_input()
    with torch.no_grad():
        logits, _ = model(idx)
    assert (logits - hf_logits(hf_gpt2, idx)).abs().max().item() <= 1e-5


def test_from_pretrained_untied_head_and_missing_weights_or_files(tmp_path):
    hf = random_gpt2(seed=3, tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    hf.save_pretrained(str(tmp_path / "untied"))
    model = GPT.from_pretrained(str(tmp_path / "untied")).eval()
    assert not model.config.tie_embeddings
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    idx = hf_input()
    with torch.no_grad():
        assert (model(idx)[0] - hf_logits(hf, idx)).abs().max().item() <= 1e-5
    # a weight missing from the checkpoint is named
    from safetensors.torch import load_file, save_file
    weights = load_file(str(tmp_path / "untied" / "model.safetensors"))
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, str(tmp_path / "untied" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.weight"):
        GPT.from_pretrained(str(tmp_path / "untied"))
    os.makedirs(tmp_path / "empty")
    with open(tmp_path / "empty" / "config.json", "w") as f:
        json.dump(hf.config.to_dict(), f)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        GPT.from_pretrained(str(tmp_path / "empty"))


def test_from_pretrained_reads_the_activation_function(tmp_path):
    # GPT-2 proper uses "gelu_new" (tanh); "gelu" is the exact erf GELU; other activations are refused by name
    exact = random_gpt2(seed=4, activation_function="gelu")
    exact.save_pretrained(str(tmp_path / "exact"))
    model = GPT.from_pretrained(str(tmp_path / "exact")).eval()
    assert model.config.mlp_act == "gelu_exact"
    idx = hf_input()
    with torch.no_grad():
        logits = model(idx)[0]
        tanh_logits = GPT.from_pretrained(str(tmp_path / "exact"), mlp_act="gelu").eval()(idx)[0]
    expected = hf_logits(exact, idx)
    assert (logits - expected).abs().max().item() <= 1e-5
    assert (tanh_logits - expected).abs().max().item() > 1e-4  # the two GELUs are told apart
    random_gpt2(seed=4, activation_function="relu").save_pretrained(str(tmp_path / "relu"))
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        GPT.from_pretrained(str(tmp_path / "relu"))


def test_from_pretrained_pad_vocab_and_overrides(hf_dir, hf_gpt2):
    model = GPT.from_pretrained(hf_dir, pad_vocab=True, dropout=0.1).eval()
    assert model.transformer.wte.weight.shape == (128, 64)
    assert model.config.dropout == 0.1
    assert torch.equal(model.transformer.wte.weight[HF_VOCAB:], torch.zeros(128 - HF_VOCAB, 64))
    idx = hf_input()
    with torch.no_grad():
        logits, _ = model(idx)
    assert logits.shape == (3, 32, HF_VOCAB)
    assert (logits - hf_logits(hf_gpt2, idx)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="sink"):
        GPT.from_pretrained(hf_dir, sink="bogus")


def export_and_reload(model, out_dir):
    from transformers import GPT2LMHeadModel
    model.export_hf(str(out_dir))
    assert os.path.exists(os.path.join(out_dir, "model.safetensors"))
    return GPT2LMHeadModel.from_pretrained(str(out_dir)).eval()


@pytest.mark.parametrize("options", [dict(), dict(tie_embeddings=False), dict(bias=False), dict(pad_vocab=True),
                                     dict(mlp_act="gelu_exact"),
                                     dict(bias=False, tie_embeddings=False, pad_vocab=True)],
                         ids=["plain", "untied", "no_bias", "pad_vocab", "gelu_exact", "all"])
def test_export_hf_round_trips_through_transformers(tmp_path, options):
    model = randomize(tiny(**options), scale=0.1).eval()
    hf = export_and_reload(model, tmp_path / "export")
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    assert hf.config.activation_function == ("gelu" if model.config.mlp_act == "gelu_exact" else "gelu_new")
    assert hf.config.vocab_size == 37 and hf.config.n_positions == 16 and hf.config.bos_token_id == 36
    idx = idx_batch(model, T=16)
    with torch.no_grad():
        ours, _ = model(idx)
    theirs = hf_logits(hf, idx)
    assert ours.shape == theirs.shape == (2, 16, 37)
    assert (ours - theirs).abs().max().item() <= 1e-5
    if not model.config.tie_embeddings:
        assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    # and back into our format
    again = GPT.from_pretrained(str(tmp_path / "export"), pad_vocab=model.config.pad_vocab).eval()
    assert again.config.mlp_act == model.config.mlp_act
    with torch.no_grad():
        assert (again(idx)[0] - ours).abs().max().item() <= 1e-6


@pytest.mark.parametrize("key,value", [("sink", "logit"), ("sink", "token"), ("sink", "bos_override"),
                                       ("attn_gate", "headwise"), ("attn_fn", "sigmoid"), ("pos_emb", "rope"),
                                       ("pos_emb", "none"), ("norm", "rmsnorm"), ("norm_pos", "post"),
                                       ("qk_norm", True), ("mlp_act", "swiglu"), ("logit_softcap", 30.0)])
def test_export_hf_refuses_what_gpt2_cannot_express(tmp_path, key, value):
    model = tiny(**{key: value})
    with pytest.raises(ValueError, match=key):
        model.export_hf(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


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


@pytest.mark.parametrize("bias", [True, False])
def test_linear_decode_layout_computes_the_same_product(bias):
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias).double()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    plain = layer(x)
    layer.decode_layout = True
    with torch.no_grad():
        assert torch.allclose(layer(x), plain, rtol=0, atol=1e-12)
        assert layer.weight_t[1].shape == (24, 40) and layer.weight_t[1].is_contiguous()
        layer.weight.mul_(2)  # an in-place update (an optimizer step, a load) makes a new copy
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-12)


def test_generate_uses_the_current_weights_and_switches_the_decode_layout_off():
    model = randomize(tiny()).double().eval()
    prompt = idx_batch(model, B=2, T=5)
    model.generate(prompt, 3, temperature=0)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 2 * 4 + 1  # c_attn, c_proj, c_fc, c_proj per layer + lm_head
    widening = [m for m in linears if m.out_features > m.in_features]  # c_attn, c_fc, lm_head: copied
    assert len(widening) == 2 * 2 + 1 and all(m.weight_t is not None for m in widening)
    assert all(m.weight_t is None for m in linears if m not in widening)
    assert not any(m.decode_layout for m in linears)
    randomize(model, seed=1)  # new weights, copied in place
    fresh = randomize(tiny(), seed=1).double().eval()
    assert torch.equal(model.generate(prompt, 20, temperature=0), fresh.generate(prompt, 20, temperature=0))
    with pytest.raises(IndexError):
        model.generate(torch.full((1, 3), 1000), 2, temperature=0)  # an error inside generate (token out of range)...
    assert not any(m.decode_layout for m in linears)  # ...still switches the layout off


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
        shapes.update({f"h.{layer}.{p}": (B, Tn, C) for p in ("resid_pre", "ln_1", "attn_out", "resid_mid", "ln_2",
                                                               "mlp_out", "resid_post")})
        shapes.update({f"h.{layer}.{p}": (B, H, Tn, D) for p in ("q", "k", "v")})
        cols = Tn + (1 if cfg.sink in ("logit", "softmax1", "kv_bias", "k_bias") else 0)
        shapes.update({f"h.{layer}.{p}": (B, H, Tn, cols) for p in ("scores", "pattern")})
        shapes[f"h.{layer}.mlp_pre"] = (B, Tn, 2 * hidden if cfg.mlp_act == "swiglu" else hidden)
        shapes[f"h.{layer}.mlp_post"] = (B, Tn, hidden)
    return shapes


@pytest.mark.parametrize("options", [dict(), dict(sink="token", n_sink_tokens=2), dict(sink="kv_bias"),
                                     dict(mlp_act="swiglu", norm_pos="post")],
                         ids=["plain", "token", "kv_bias", "swiglu-post"])
def test_every_hook_point_reads_the_right_shape_and_costs_nothing(options):
    model = randomize(tiny(**options)).double().eval()
    idx = idx_batch(model, B=2, T=7)
    with torch.no_grad():
        plain, _ = model(idx)
    names = model.hook_names()
    expected = expected_hook_shapes(model, 2, 7)
    assert sorted(names) == sorted(expected)
    seen = {}
    for name in names:
        model.add_hook(name, lambda x, name=name: seen.__setitem__(name, tuple(x.shape)))
    with torch.no_grad():
        hooked, _ = model(idx)
    assert seen == expected
    # reading hooks change nothing (the scores hooks switch to the eager path: equal to float64 rounding)
    assert (hooked - plain).abs().max().item() < 1e-12
    model.clear_hooks()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], plain)


def test_hooks_are_free_and_clear_hooks_restores_the_fresh_model():
    model = randomize(tiny(), seed=4).eval()
    fresh = tiny()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    idx = idx_batch(model)
    with torch.no_grad():
        reference, _ = fresh(idx)
        for name in ("embed", "h.0.resid_post", "h.1.mlp_post", "ln_f"):  # not attention: same fused path
            model.add_hook(name, lambda x: None)
        assert torch.equal(model(idx)[0], reference)
        model.add_hook("h.0.attn_out", lambda x: torch.zeros_like(x))
        assert not torch.allclose(model(idx)[0], reference)
        model.clear_hooks()
        assert torch.equal(model(idx)[0], reference)
        assert model.hooks == {} and all(b.hooks == {} for b in model.transformer.h)


def test_patching_hooks_replace_the_activation():
    model = randomize(tiny()).double().eval()
    idx = idx_batch(model)
    with torch.no_grad():
        # the last block's output zeroed: every position's logits are lm_head(ln_f(0)) = lm_head(ln_f.bias)
        model.add_hook("h.1.resid_post", lambda x: torch.zeros_like(x))
        logits, _ = model(idx)
        expected = model.transformer.ln_f.bias @ model.lm_head.weight.T
        torch.testing.assert_close(logits, expected.expand_as(logits), rtol=0, atol=1e-12)
        model.clear_hooks()
        # a uniform causal pattern in layer 0 equals the attention output averaging the values
        captured = {}
        model.add_hook("h.0.v", lambda v: captured.setdefault("v", v))
        model.add_hook("h.0.pattern", lambda p: torch.ones_like(p).tril() / torch.arange(1, p.size(-1) + 1,
                                                                                            dtype=p.dtype)[:, None])
        model.add_hook("h.0.attn_out", lambda x: captured.setdefault("out", x))
        model(idx)
        model.clear_hooks()
    v = captured["v"]  # (B, H, T, D)
    mean_v = v.cumsum(2) / torch.arange(1, v.size(2) + 1, dtype=v.dtype)[:, None]
    attn = model.transformer.h[0].attn
    y = mean_v.transpose(1, 2).reshape(2, 12, 32) @ attn.c_proj.weight.T + attn.c_proj.bias
    torch.testing.assert_close(captured["out"], y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["bogus", "h.2.q", "h.0.nope", "h.x.q", "h.0", "blocks.0.q"])
def test_unknown_hook_names_raise_keyerror_listing_the_valid_ones(name):
    model = tiny()
    with pytest.raises(KeyError) as info:
        model.add_hook(name, lambda x: None)
    message = str(info.value)
    assert name in message
    for valid in ("embed", "ln_f", "resid_post", "pattern", "mlp_pre"):
        assert valid in message


# ------------------------------------------------------------------------------------------------
# architecture ablations


def test_rope_scores_depend_only_on_relative_position():
    model = randomize(tiny(pos_emb="rope", block_size=32)).double().eval()
    assert not hasattr(model.transformer, "wpe")
    captured = {}
    model.add_hook("h.0.scores", lambda s: captured.setdefault("s", s))
    with torch.no_grad():
        model(torch.full((1, 20), 5))
    s = captured["s"][0]  # (H, T, T); identical tokens: q_i . k_j depends on i - j only
    for i in range(20):  # (to the float32 rounding of the model's rotary tables)
        for j in range(i + 1):
            torch.testing.assert_close(s[:, i, j], s[:, i - j, 0], rtol=0, atol=1e-6)
    assert (s[:, 1:, 0] - s[:, 1:, 1:].diagonal(dim1=1, dim2=2)).abs().max() > 1e-3  # the offset matters
    # learned positions do not have the property
    learned = randomize(tiny(block_size=32)).double().eval()
    learned.add_hook("h.0.scores", lambda s: captured.__setitem__("l", s))
    with torch.no_grad():
        learned(torch.full((1, 20), 5))
    s = captured["l"][0]
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
    captured = {}
    model.add_hook("h.0.ln_1", lambda x: captured.setdefault("ln", x))
    model.add_hook("h.0.resid_pre", lambda x: captured.setdefault("x", x))
    with torch.no_grad():
        model(idx_batch(model))
    ln, x = captured["ln"], captured["x"]
    torch.testing.assert_close(ln, x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt(), rtol=0, atol=1e-12)
    assert ln.mean(-1).abs().max() > 1e-3  # not centred


def test_post_norm_block_output_is_normalised():
    model = randomize(tiny(norm_pos="post")).double().eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
    captured = {}
    for point in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        model.add_hook(f"h.1.{point}", lambda x, point=point: captured.setdefault(point, x))
    with torch.no_grad():
        model(idx_batch(model))

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
    pre.add_hook("h.1.resid_post", lambda x: captured.__setitem__("pre", x))
    with torch.no_grad():
        pre(idx_batch(pre))
    assert (captured["pre"].std(-1, unbiased=False) - 1).abs().max() > 0.05


def test_qk_norm_gives_unit_rms_queries_and_keys():
    model = randomize(tiny(qk_norm=True)).double().eval()
    attn = model.transformer.h[0].attn
    assert attn.q_norm.weight.shape == (16,)
    with torch.no_grad():
        attn.q_norm.weight.fill_(1.0)
        attn.k_norm.weight.fill_(1.0)
    captured = {}
    model.add_hook("h.0.q", lambda q: captured.setdefault("q", q))
    model.add_hook("h.0.k", lambda k: captured.setdefault("k", k))
    with torch.no_grad():
        model(idx_batch(model))
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
    captured = {}
    model.add_hook("h.0.mlp_pre", lambda h: captured.setdefault("pre", h))
    model.add_hook("h.0.mlp_post", lambda h: captured.setdefault("post", h))
    with torch.no_grad():
        model(idx_batch(model))
    pre, post = captured["pre"], captured["post"]
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
