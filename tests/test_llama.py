"""The Llama family (sinkgpt.pretrained): random LlamaForCausalLM folders that transformers builds and saves itself,
at odd shapes, load into our GPT with transformers' logits (float32 and float64), export back, generate greedily
like transformers' generate, and every field we do not implement is refused with one line naming it."""
import json
import os

import pytest
import torch

from conftest import assert_greedy_equals_transformers, hf_logits, max_diff, random_tokens, randomize_hf, save
from model import GPT
from sinkgpt.pretrained import PretrainedError, export_hf, from_pretrained

V = 101  # an odd vocabulary


def llama_config(**overrides):
    from transformers import LlamaConfig
    kwargs = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def random_llama(seed=0, dtype=torch.float32, **overrides):
    """A LlamaForCausalLM with every weight random (norm gains too, so a wrong mapping shows)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides)).to(dtype)
    return randomize_hf(model, lambda name: name.endswith("norm.weight"))


def tokens(B=2, T=20, seed=0):
    return random_tokens(V, B, T, seed)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_logits_equal_transformers_in_float32(tmp_path, tied):
    hf = random_llama(seed=1, tie_word_embeddings=tied)
    model = from_pretrained(save(hf, tmp_path / "llama")).eval()
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.n_embd, cfg.hidden_size) == (3, 6, 2, 48, 80)
    assert (cfg.pos_emb, cfg.norm, cfg.mlp_act, cfg.bias, cfg.rope_base) == ("rope", "rmsnorm", "swiglu", False, 1e5)
    assert cfg.tie_embeddings == tied and cfg.bos_token == 1 and cfg.block_size == 64
    idx = tokens()
    with torch.no_grad():
        ours, _ = model(idx)
    assert ours.shape == (2, 20, V)
    assert max_diff(ours, hf_logits(hf, idx)) <= 1e-5


def test_llama_logits_equal_transformers_in_float64(tmp_path, monkeypatch):
    """transformers computes its rotary angles and its RMSNorm in float32 whatever the model's dtype. With its
    rotary tables in our model and its RMSNorm kept in the input's dtype (the same formula), everything agrees to
    float64 rounding."""
    from transformers.models.llama import modeling_llama

    def rms_norm_in_input_dtype(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    hf = random_llama(seed=2)
    folder = save(hf, tmp_path / "llama")
    model = from_pretrained(folder).double().eval()
    hf = hf.double()
    idx = tokens(seed=3)
    with torch.no_grad():
        positions = torch.arange(model.config.block_size)[None]
        cos, sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float64), positions)
        half = model.config.head_size // 2
        model.rope_cos, model.rope_sin = cos[0, :, :half], sin[0, :, :half]  # transformers repeats the halves
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-10


def test_one_layers_residual_stream_equals_transformers_hidden_states(tmp_path):
    """hidden_states[i + 1] of transformers is our block i's output (the last one is after the final norm)."""
    hf = random_llama(seed=4)
    model = from_pretrained(save(hf, tmp_path / "llama")).eval()
    idx = tokens(seed=5)
    with torch.no_grad():
        theirs = hf(idx, output_hidden_states=True).hidden_states
        _, _, cache = model.run_with_cache(idx, ["h.1.resid_post", "embed"])
    assert max_diff(cache["embed"], theirs[0]) == 0.0
    assert max_diff(cache["h.1.resid_post"], theirs[2]) <= 1e-5


def test_sharded_safetensors_and_attention_biases_load(tmp_path):
    hf = random_llama(seed=6, attention_bias=True, mlp_bias=True)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "sharded" / "model.safetensors")
    model = from_pretrained(str(tmp_path / "sharded")).eval()
    assert model.config.bias
    idx = tokens(seed=7)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5
    os.remove(tmp_path / "sharded" / sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[0])
    with pytest.raises(PretrainedError, match="missing"):
        from_pretrained(str(tmp_path / "sharded"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_writes_a_llama_that_transformers_loads_with_the_same_logits(tmp_path, tied):
    from transformers import LlamaForCausalLM
    model = from_pretrained(save(random_llama(seed=8, tie_word_embeddings=tied), tmp_path / "in"),
                            pad_vocab=True).eval()
    export_hf(model, str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert again.config.tie_word_embeddings == tied and again.config.num_key_value_heads == 2
    idx = tokens(seed=9)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(again, idx)) <= 1e-5
    assert max_diff(from_pretrained(str(tmp_path / "out")).eval()(idx)[0], model(idx)[0]) <= 1e-6


def test_a_model_trained_here_with_the_llama_switches_exports_as_llama(tmp_path):
    from transformers import LlamaForCausalLM
    from model import GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                          pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", rope_base=500.0, norm_eps=1e-6)).eval()
    export_hf(model, str(tmp_path / "out"))
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    idx = tokens(T=30, seed=10)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5


@pytest.mark.parametrize("options", [dict(sink="kv_bias"), dict(attn_gate="headwise"), dict(qk_norm=True),
                                     dict(norm_pos="post"), dict(logit_softcap=30.0), dict(attn_fn="sigmoid")])
def test_llama_export_refuses_what_the_format_cannot_express(tmp_path, options):
    model = from_pretrained(save(random_llama(seed=11), tmp_path / "in"), **options)
    key = next(iter(options))
    with pytest.raises(PretrainedError, match=key):
        export_hf(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_greedy_generation_with_the_kv_cache_equals_transformers_generate(tmp_path):
    hf = random_llama(seed=12)
    model = from_pretrained(save(hf, tmp_path / "llama")).eval()
    prompt = tokens(B=1, T=7, seed=13)
    assert_greedy_equals_transformers(model, hf, prompt)


@pytest.mark.parametrize("sink", ["logit", "softmax1", "kv_bias", "k_bias", "token", "bos_override",
                                  "gate_headwise", "gate_elementwise"])
def test_sink_options_start_close_to_the_pretrained_llama(tmp_path, sink):
    """The neutral start (init_sinks_from_pretrained) on a GQA Llama: plain logits up to the mechanism's known
    deviation (docs/explicit_sinks.md table), and the slot keys have one row per key/value head. The Llama has no biases; its
    gate starts at sigmoid(0) = 1/2 through the gate's own bias, with c_proj doubled: exact."""
    hf = random_llama(seed=14)
    folder = save(hf, tmp_path / "llama")
    options = {"attn_gate": sink[5:]} if sink.startswith("gate_") else {"sink": sink}
    model = from_pretrained(folder, **options).eval()
    assert not model.config.bias
    if sink in ("kv_bias", "k_bias"):
        assert model.transformer.h[0].attn.k_slot.shape == (2, 8)
    idx = tokens(seed=15)
    idx[:, 0] = model.config.bos_token
    with torch.no_grad():
        ours, plain = model(idx)[0], hf_logits(hf, idx)
    bound = {"bos_override": 1e-5, "gate_headwise": 1e-6, "gate_elementwise": 1e-6}.get(sink, 1.0)
    assert max_diff(ours, plain) / plain.abs().max().item() <= bound


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("attention_bias", True), ("mlp_bias", True),
    ("head_dim", 16), ("hidden_act", "gelu"), ("sliding_window", 16), ("attention_dropout", 0.1),
    ("rope_parameters", {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0})])
def test_llama_fields_we_do_not_implement_are_refused_by_name(tmp_path, field, value):
    folder = save(random_llama(seed=16), tmp_path / "llama")
    config = json.load(open(os.path.join(folder, "config.json")))
    config[field] = value
    if field in ("attention_bias", "mlp_bias"):  # one without the other: our model has one switch for both
        config["mlp_bias" if field == "attention_bias" else "attention_bias"] = False
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(PretrainedError, match=field) as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_an_unknown_model_type_is_refused(tmp_path):
    folder = save(random_llama(seed=17), tmp_path / "llama")
    config = json.load(open(os.path.join(folder, "config.json")))
    config["model_type"] = "falcon"
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(PretrainedError, match="falcon"):
        from_pretrained(folder)
