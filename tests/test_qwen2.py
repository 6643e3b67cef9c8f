"""The Qwen2 family (sinkgpt.pretrained): random Qwen2ForCausalLM folders that transformers builds and saves itself
(Llama with biases on the query, key and value projections only) load into our GPT with transformers' logits,
generate greedily like transformers' generate, export back to a folder transformers loads, and every field we do
not implement is refused with one line naming it."""
import json
import os

import pytest
import torch

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
    model = Qwen2ForCausalLM(qwen2_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def save(model, folder):
    model.save_pretrained(str(folder))
    return str(folder)


def tokens(B=2, T=20, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


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
    hf.generation_config.eos_token_id = None  # generate all 25 tokens, as ours does
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=25, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, 25, temperature=0), theirs)


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
