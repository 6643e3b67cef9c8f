"""The Mistral family (sinkgpt.pretrained): random MistralForCausalLM folders that transformers builds and saves
itself (Llama with a sliding window on every layer) load into our GPT with attn_window = sliding_window and
transformers' logits, generate greedily like transformers' generate past the window (the KV cache drops what
leaves it), export back to a folder transformers loads, and every field we do not implement is refused with one
line naming it."""
import json
import os

import pytest
import torch

from conftest import assert_greedy_equals_transformers, hf_logits, max_diff, random_tokens, randomize_hf, save
from model import GPT, GPTConfig
from sinkgpt.pretrained import PretrainedError, export_hf, from_pretrained

V = 101  # an odd vocabulary
WINDOW = 6  # shorter than the test sequences, so that it hides keys


def mistral_config(**overrides):
    from transformers import MistralConfig
    kwargs = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                  sliding_window=WINDOW, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    return MistralConfig(**kwargs)


def random_mistral(seed=0, **overrides):
    """A MistralForCausalLM with every weight random (norm gains too, so a wrong mapping shows)."""
    from transformers import MistralForCausalLM
    torch.manual_seed(seed)
    return randomize_hf(MistralForCausalLM(mistral_config(**overrides)), lambda name: "norm" in name)


def tokens(B=2, T=20, seed=0):
    return random_tokens(V, B, T, seed)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_mistral_logits_equal_transformers_in_float32(tmp_path, tied):
    hf = random_mistral(seed=1, tie_word_embeddings=tied)
    folder = save(hf, tmp_path / "mistral")
    model = from_pretrained(folder).eval()
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.n_embd, cfg.hidden_size) == (3, 6, 2, 48, 80)
    assert (cfg.pos_emb, cfg.norm, cfg.mlp_act, cfg.bias, cfg.qkv_bias) == ("rope", "rmsnorm", "swiglu", False, False)
    assert cfg.attn_window == WINDOW and cfg.tie_embeddings == tied and cfg.bos_token == 1
    idx = tokens()
    expected = hf_logits(hf, idx)
    with torch.no_grad():
        assert max_diff(model(idx)[0], expected) <= 1e-5
        # the window is what makes them equal: full attention differs from position WINDOW on, not before
        full = from_pretrained(folder, attn_window=0).eval()(idx)[0]
    assert max_diff(full[:, :WINDOW], expected[:, :WINDOW]) <= 1e-5
    assert max_diff(full[:, WINDOW:], expected[:, WINDOW:]) > 1e-3


@pytest.mark.parametrize("sliding_window", [None, 64, 100], ids=["null", "the_context", "longer"])
def test_a_window_that_hides_nothing_is_full_attention(tmp_path, sliding_window):
    hf = random_mistral(seed=2, sliding_window=sliding_window)
    model = from_pretrained(save(hf, tmp_path / "mistral")).eval()
    assert model.config.attn_window == 0
    idx = tokens(T=40, seed=3)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5


def test_greedy_generation_past_the_window_equals_transformers_generate(tmp_path):
    hf = random_mistral(seed=4)
    model = from_pretrained(save(hf, tmp_path / "mistral")).eval()
    prompt = tokens(B=1, T=7, seed=5)
    assert_greedy_equals_transformers(model, hf, prompt)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_writes_a_mistral_that_transformers_loads_with_the_same_logits(tmp_path, tied):
    from transformers import MistralForCausalLM
    model = from_pretrained(save(random_mistral(seed=6, tie_word_embeddings=tied), tmp_path / "in"),
                            pad_vocab=True).eval()
    export_hf(model, str(tmp_path / "out"))
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert written["architectures"] == ["MistralForCausalLM"] and written["sliding_window"] == WINDOW
    again = MistralForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert again.config.tie_word_embeddings == tied and again.config.num_key_value_heads == 2
    idx = tokens(seed=7)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(again, idx)) <= 1e-5
        assert max_diff(from_pretrained(str(tmp_path / "out")).eval()(idx)[0], model(idx)[0]) <= 1e-6


def test_a_model_trained_here_with_a_window_exports_as_mistral(tmp_path):
    from transformers import MistralForCausalLM
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                          pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", norm_eps=1e-6, attn_window=5)).eval()
    export_hf(model, str(tmp_path / "out"))
    hf = MistralForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert hf.config.sliding_window == 5
    idx = tokens(T=30, seed=8)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5


@pytest.mark.parametrize("options,family", [
    (dict(attn_window=[4, 8]), "Qwen2"),  # one window size per model in Hugging Face's families
    (dict(attn_window=4, bias=True), "Llama"),  # biases: only Llama's format, which has no windows
    (dict(attn_window=4, norm="layernorm", mlp_act="gelu"), "GPT-NeoX"),
    (dict(attn_window=4, pos_emb="learned", norm="layernorm", mlp_act="gelu"), "GPT-2")])
def test_windows_no_format_holds_are_refused_by_name(tmp_path, options, family):
    kwargs = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=False, pos_emb="rope",
                  norm="rmsnorm", mlp_act="swiglu")
    model = GPT(GPTConfig(**dict(kwargs, **options)))
    with pytest.raises(PretrainedError, match=f"{family} format cannot express.*attn_window"):
        export_hf(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("field,value", [("sliding_window", -4), ("sliding_window", 2.5), ("hidden_act", "gelu"),
                                         ("head_dim", 16), ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                         ("attention_dropout", 0.1)])
def test_mistral_fields_we_do_not_implement_are_refused_by_name(tmp_path, field, value):
    folder = save(random_mistral(seed=9), tmp_path / "mistral")
    config = json.load(open(os.path.join(folder, "config.json")))
    config[field] = value
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(PretrainedError, match=field) as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("sink", ["logit", "kv_bias", "token", "gate_headwise"])
def test_sink_options_on_a_mistral_start_close_and_decode_as_they_compute(tmp_path, sink):
    """A windowed model with each dedicated sink: it starts close to the pretrained model (the bounds of
    test_llama.py), and generating through the KV cache past the window gives the tokens of full forward passes."""
    hf = random_mistral(seed=10)
    options = {"attn_gate": sink[5:]} if sink.startswith("gate_") else {"sink": sink}
    model = from_pretrained(save(hf, tmp_path / "mistral"), **options).eval()
    idx = tokens(seed=11).clamp(min=2)  # BOS (1) at position 0 only
    idx[:, 0] = model.config.bos_token
    with torch.no_grad():
        ours, plain = model(idx)[0], hf_logits(hf, idx)
    assert max_diff(ours, plain) / plain.abs().max().item() <= (1e-6 if sink.startswith("gate_") else 1.0)
    prompt = idx[:1, :5]
    assert torch.equal(model.generate(prompt, 15, temperature=0),
                       model.generate(prompt, 15, temperature=0, use_cache=False))
