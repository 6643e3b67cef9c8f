"""The Qwen2 family (sinkgpt.pretrained): random Qwen2ForCausalLM folders that transformers builds and saves itself
(Llama with biases on the query, key and value projections only) load into our GPT with transformers' logits,
generate greedily like transformers' generate, export back to a folder transformers loads, and every field we do
not implement is refused with one line naming it."""
import json
import os

import pytest
import torch

from conftest import assert_greedy_equals_transformers, hf_logits, max_diff, random_tokens, randomize_hf, save
from model import GPT, GPTConfig
from sinkgpt.pretrained import PretrainedError, export_hf, from_pretrained

V = 101  # an odd vocabulary


def qwen2_config(**overrides):
    from transformers import Qwen2Config
    kwargs = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=100000.0,
                  tie_word_embeddings=True, bos_token_id=None, eos_token_id=2)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def random_qwen2(seed=0, **overrides):
    """A Qwen2ForCausalLM with every weight random (norm gains and q/k/v biases too, so a wrong mapping shows)."""
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(seed)
    return randomize_hf(Qwen2ForCausalLM(qwen2_config(**overrides)), lambda name: "norm" in name)


def tokens(B=2, T=20, seed=0):
    return random_tokens(V, B, T, seed)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_qwen2_logits_equal_transformers_in_float32(tmp_path, tied):
    hf = random_qwen2(seed=1, tie_word_embeddings=tied)
    model = from_pretrained(save(hf, tmp_path / "qwen2")).eval()
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.n_embd, cfg.hidden_size) == (3, 6, 2, 48, 80)
    assert (cfg.pos_emb, cfg.norm, cfg.mlp_act, cfg.bias, cfg.qkv_bias) == ("rope", "rmsnorm", "swiglu", False, True)
    assert cfg.tie_embeddings == tied and cfg.bos_token == 2 and cfg.rope_base == 1e5  # no BOS: EOS separates
    attn = model.transformer.h[0].attn
    assert attn.c_attn.bias.shape == (48 + 2 * 2 * 8,) and attn.c_proj.bias is None
    assert model.transformer.h[0].mlp.c_fc.bias is None
    idx = tokens()
    with torch.no_grad():
        ours, _ = model(idx)
        assert max_diff(ours, hf_logits(hf, idx)) <= 1e-5
        attn.c_attn.bias.zero_()  # the biases are read: without them the logits move
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) > 1e-3


def test_greedy_generation_with_the_kv_cache_equals_transformers_generate(tmp_path):
    hf = random_qwen2(seed=2)
    model = from_pretrained(save(hf, tmp_path / "qwen2")).eval()
    prompt = tokens(B=1, T=7, seed=3)
    assert_greedy_equals_transformers(model, hf, prompt)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_writes_a_qwen2_that_transformers_loads_with_the_same_logits(tmp_path, tied):
    from transformers import Qwen2ForCausalLM
    model = from_pretrained(save(random_qwen2(seed=4, tie_word_embeddings=tied), tmp_path / "in"),
                            pad_vocab=True).eval()
    export_hf(model, str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["Qwen2ForCausalLM"]
    again = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert again.config.tie_word_embeddings == tied and again.config.num_key_value_heads == 2
    idx = tokens(seed=5)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(again, idx)) <= 1e-5
        assert max_diff(from_pretrained(str(tmp_path / "out")).eval()(idx)[0], model(idx)[0]) <= 1e-6


def test_a_model_trained_here_with_q_k_v_biases_only_exports_as_qwen2(tmp_path):
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                          qkv_bias=True, pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", norm_eps=1e-6)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(0.0, 0.5)
    export_hf(model, str(tmp_path / "out"))
    hf = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    idx = tokens(T=30, seed=6)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5


def test_a_llama_with_biases_everywhere_still_exports_as_llama():
    from sinkgpt.pretrained import export_family
    llama = dict(pos_emb="rope", norm="rmsnorm", mlp_act="swiglu")
    assert export_family(GPTConfig(**llama, bias=False)) == ("llama", [])
    assert export_family(GPTConfig(**llama, bias=True, qkv_bias=True)) == ("llama", [])
    assert export_family(GPTConfig(**llama, bias=False, qkv_bias=True)) == ("qwen2", [])
    assert export_family(GPTConfig(**llama, bias=False, qkv_bias=True, parallel_residual=True)) == \
        ("qwen2", ["parallel_residual"])


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"), ("head_dim", 16), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("attention_dropout", 0.1), ("rope_parameters", {"rope_theta": 1e4, "rope_type": "default",
                                                     "partial_rotary_factor": 0.5})])
def test_qwen2_fields_we_do_not_implement_are_refused_by_name(tmp_path, field, value):
    folder = save(random_qwen2(seed=7), tmp_path / "qwen2")
    config = json.load(open(os.path.join(folder, "config.json")))
    config[field] = value
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(PretrainedError, match=field if field != "rope_parameters" else "partial_rotary_factor") as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# sliding windows on some layers (use_sliding_window, max_window_layers, layer_types)


@pytest.mark.parametrize("window_options,windows", [
    (dict(use_sliding_window=True, sliding_window=6, max_window_layers=1), [0, 6, 6]),
    (dict(use_sliding_window=True, sliding_window=5,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"]), [5, 0, 5]),
    (dict(use_sliding_window=True, sliding_window=6, max_window_layers=0), 6),
    (dict(use_sliding_window=False, sliding_window=6, max_window_layers=0), 0)],
    ids=["from_max_window_layers", "layer_types", "every_layer", "switched_off"])
def test_qwen2_sliding_windows_become_per_layer_attn_windows(tmp_path, window_options, windows):
    hf = random_qwen2(seed=8, **window_options)
    folder = save(hf, tmp_path / "qwen2")
    model = from_pretrained(folder).eval()
    assert model.config.attn_window == windows
    idx = tokens(seed=9)
    expected = hf_logits(hf, idx)
    with torch.no_grad():
        assert max_diff(model(idx)[0], expected) <= 1e-5
        if windows:  # the windows are what makes them equal
            assert max_diff(from_pretrained(folder, attn_window=0).eval()(idx)[0], expected) > 1e-3
    if windows:
        assert_greedy_equals_transformers(model, hf, tokens(B=1, T=7, seed=10), new_tokens=20)


def test_export_of_per_layer_windows_writes_qwen2_layer_types(tmp_path):
    """A model of ours with a window on some layers and no q/k/v biases: Qwen2's layer_types hold it (with zero
    biases); the same window on every layer is a Mistral."""
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                          pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", norm_eps=1e-6, attn_window=[4, 0])).eval()
    export_hf(model, str(tmp_path / "out"))
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["sliding_window"] == 4
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    hf = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    idx = tokens(T=30, seed=11)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5
    assert from_pretrained(str(tmp_path / "out")).config.attn_window == [4, 0, 4]


@pytest.mark.parametrize("window_options,field", [
    (dict(use_sliding_window=True, sliding_window=6, layer_types=["sliding_attention", "chunked_attention",
                                                                  "full_attention"]), "layer_types"),
    (dict(use_sliding_window=True, sliding_window=0), "sliding_window"),
    (dict(use_sliding_window=False, layer_types=["sliding_attention", "full_attention", "full_attention"]),
     "layer_types")])
def test_qwen2_windows_we_do_not_implement_are_refused_by_name(tmp_path, window_options, field):
    folder = save(random_qwen2(seed=12), tmp_path / "qwen2")
    config = json.load(open(os.path.join(folder, "config.json")))
    config.update(window_options)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(PretrainedError, match=field) as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_qwen2_layers_without_layer_types_are_derived_as_transformers_does(tmp_path):
    """A config.json written before layer_types existed: the layers from max_window_layers on have the window."""
    hf = random_qwen2(seed=13, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    folder = save(hf, tmp_path / "qwen2")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config.pop("layer_types") == ["full_attention", "full_attention", "sliding_attention"]
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    model = from_pretrained(folder).eval()
    assert model.config.attn_window == [0, 0, 6]
    idx = tokens(seed=14)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5
