"""The GPT-NeoX family (Pythia; sinkgpt.pretrained): random GPTNeoXForCausalLM folders that transformers builds and
saves itself load into our GPT with transformers' logits (partial rotary, parallel or sequential residual, tied or
untied head), generate greedily like transformers' generate, export back to a folder transformers loads, keep the
sink options and the BOS-as-slot conversion exact, read a Pythia-style tokenizer.json as transformers does, and
every field we do not implement is refused with one line naming it."""
import json
import os

import pytest
import torch

from conftest import (assert_greedy_equals_transformers, hf_logits, max_diff, random_tokens, randomize_hf, save,
                      shakespeare_excerpt)
from model import GPT, GPTConfig, bos_as_slot
from sinkgpt.pretrained import PretrainedError, export_hf, from_pretrained

V = 101  # an odd vocabulary


def neox_config(**overrides):
    from transformers import GPTNeoXConfig
    kwargs = dict(vocab_size=V, hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=500.0, layer_norm_eps=1e-5,
                  use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    return GPTNeoXConfig(**kwargs)


def random_neox(seed=0, **overrides):
    """A GPTNeoXForCausalLM with every weight random (norm gains and biases too, so a wrong mapping shows)."""
    from transformers import GPTNeoXForCausalLM
    torch.manual_seed(seed)
    return randomize_hf(GPTNeoXForCausalLM(neox_config(**overrides)),
                        lambda name: "layernorm.weight" in name or "final_layer_norm.weight" in name)


def tokens(B=2, T=20, seed=0):
    return random_tokens(V, B, T, seed)


@pytest.mark.parametrize("rotary_pct,parallel,tied", [(0.25, True, False), (0.5, False, False), (1.0, True, True)],
                         ids=["pythia", "sequential", "full_rotary_tied"])
def test_gpt_neox_logits_equal_transformers_in_float32(tmp_path, rotary_pct, parallel, tied):
    hf = random_neox(seed=1, rotary_pct=rotary_pct, use_parallel_residual=parallel, tie_word_embeddings=tied)
    model = from_pretrained(save(hf, tmp_path / "neox")).eval()
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.hidden_size, cfg.block_size) == (3, 4, 64, 80, 64)
    assert (cfg.pos_emb, cfg.norm, cfg.mlp_act, cfg.bias, cfg.rope_base) == ("rope", "layernorm", "gelu_exact", True,
                                                                              500.0)
    assert cfg.rotary_pct == rotary_pct and cfg.rotary_dims == int(16 * rotary_pct)
    assert cfg.parallel_residual == parallel and cfg.tie_embeddings == tied and cfg.bos_token == 0
    idx = tokens()
    with torch.no_grad():
        ours, _ = model(idx)
    assert ours.shape == (2, 20, V)
    assert max_diff(ours, hf_logits(hf, idx)) <= 1e-5


def test_each_gpt_neox_feature_changes_the_logits(tmp_path):
    """The loaded model depends on every mapping: the wrong residual, rotary width, head order of the fused q/k/v,
    or GELU each moves the logits far from transformers'."""
    hf = random_neox(seed=2)
    folder = save(hf, tmp_path / "neox")
    idx = tokens(seed=3)
    expected = hf_logits(hf, idx)
    for override in (dict(parallel_residual=False), dict(rotary_pct=0.5), dict(mlp_act="gelu")):
        with torch.no_grad():
            assert max_diff(from_pretrained(folder, **override).eval()(idx)[0], expected) > 1e-3, override
    model = from_pretrained(folder).eval()
    with torch.no_grad():  # queries of head 0 swapped with its keys: what reading the fused rows flat would do
        c_attn = model.transformer.h[0].attn.c_attn
        c_attn.weight[:16], c_attn.weight[64:80] = c_attn.weight[64:80].clone(), c_attn.weight[:16].clone()
        assert max_diff(model(idx)[0], expected) > 1e-3


def test_hidden_states_equal_transformers_layer_by_layer(tmp_path):
    """transformers' hidden_states[i + 1] is our block i's output, the parallel residual included."""
    hf = random_neox(seed=4)
    model = from_pretrained(save(hf, tmp_path / "neox")).eval()
    idx = tokens(seed=5)
    with torch.no_grad():
        theirs = hf(idx, output_hidden_states=True).hidden_states
        _, _, cache = model.run_with_cache(idx, ["embed", "h.0.resid_post", "h.1.resid_post"])
    assert max_diff(cache["embed"], theirs[0]) == 0.0
    assert max_diff(cache["h.0.resid_post"], theirs[1]) <= 1e-5
    assert max_diff(cache["h.1.resid_post"], theirs[2]) <= 1e-5


def test_greedy_generation_with_the_kv_cache_equals_transformers_generate(tmp_path):
    hf = random_neox(seed=6)
    model = from_pretrained(save(hf, tmp_path / "neox")).eval()
    prompt = tokens(B=1, T=7, seed=7)
    assert_greedy_equals_transformers(model, hf, prompt)


def test_a_transformers_4_pythia_config_and_embed_out_load(tmp_path):
    """Pythia's own folders name the rotary settings rotary_pct / rotary_emb_base (no rope_parameters) and the head
    embed_out, and old ones carry buffers (the causal mask, inv_freq); transformers 5 writes rope_parameters and may
    name the head lm_head. Both read the same."""
    from safetensors.torch import load_file, save_file
    hf = random_neox(seed=8, rotary_pct=0.5)
    folder = save(hf, tmp_path / "neox")
    config = json.load(open(os.path.join(folder, "config.json")))
    del config["rope_parameters"]
    config.update(rotary_pct=0.5, rotary_emb_base=500.0, rope_scaling=None)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    weights = load_file(os.path.join(folder, "model.safetensors"))
    head = "embed_out.weight" if "embed_out.weight" in weights else "lm_head.weight"
    weights[{"embed_out.weight": "lm_head.weight", "lm_head.weight": "embed_out.weight"}[head]] = weights.pop(head)
    weights["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()  # old buffers
    weights["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    model = from_pretrained(folder).eval()
    assert (model.config.rotary_pct, model.config.rope_base) == (0.5, 500.0)
    idx = tokens(seed=9)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5
    del config["rotary_pct"]  # missing: transformers takes GPT-NeoX's 0.25
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    assert from_pretrained(folder).config.rotary_pct == 0.25


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_writes_a_gpt_neox_that_transformers_loads_with_the_same_logits(tmp_path, tied):
    from transformers import GPTNeoXForCausalLM
    model = from_pretrained(save(random_neox(seed=10, tie_word_embeddings=tied), tmp_path / "in"),
                            pad_vocab=True).eval()
    export_hf(model, str(tmp_path / "out"))
    written = json.load(open(tmp_path / "out" / "config.json"))
    assert written["architectures"] == ["GPTNeoXForCausalLM"] and written["rotary_pct"] == 0.25
    again = GPTNeoXForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert again.config.tie_word_embeddings == tied and again.config.use_parallel_residual
    idx = tokens(seed=11)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(again, idx)) <= 1e-5
        assert max_diff(from_pretrained(str(tmp_path / "out")).eval()(idx)[0], model(idx)[0]) <= 1e-6


def test_a_model_trained_here_with_the_gpt_neox_switches_exports_as_gpt_neox(tmp_path):
    """A rotary / LayerNorm / GELU model of ours without biases but with q/k/v biases: GPT-NeoX holds it exactly
    (zero biases elsewhere)."""
    from transformers import GPTNeoXForCausalLM
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False, qkv_bias=True,
                          pos_emb="rope", rotary_pct=0.5, parallel_residual=True, mlp_act="gelu",
                          tie_embeddings=False)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(0.0, 0.5)
    export_hf(model, str(tmp_path / "out"))
    hf = GPTNeoXForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert hf.config.hidden_act == "gelu_new"
    idx = tokens(T=30, seed=12)
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf_logits(hf, idx)) <= 1e-5


@pytest.mark.parametrize("options", [dict(sink="logit"), dict(n_kv_head=1), dict(mlp_act="relu"),
                                     dict(attn_gate="headwise")])
def test_gpt_neox_export_refuses_what_the_format_cannot_express(tmp_path, options):
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16, pos_emb="rope",
                          parallel_residual=True, **options))
    with pytest.raises(PretrainedError, match=f"GPT-NeoX format cannot express.*{next(iter(options))}"):
        export_hf(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("sink", ["logit", "kv_bias", "token", "bos_override", "gate_headwise"])
def test_sink_options_compose_with_the_gpt_neox_block(tmp_path, sink):
    """A parallel-residual, partial-rotary model with each dedicated sink: it loads, runs, trains (gradients reach
    the new parameter) and starts close to the pretrained model (the bounds of test_llama.py)."""
    hf = random_neox(seed=13)
    options = {"attn_gate": sink[5:]} if sink.startswith("gate_") else {"sink": sink}
    model = from_pretrained(save(hf, tmp_path / "neox"), **options).eval()
    idx = tokens(seed=14).clamp(min=1)  # BOS (0) at position 0 only
    idx[:, 0] = model.config.bos_token
    with torch.no_grad():
        ours, plain = model(idx)[0], hf_logits(hf, idx)
    bound = {"bos_override": 1e-5, "gate_headwise": 1e-6}.get(sink, 1.0)
    assert max_diff(ours, plain) / plain.abs().max().item() <= bound
    _, loss = model.train()(idx[:, :-1], idx[:, 1:])
    loss.backward()
    new = [p for name, p in model.named_parameters() if any(k in name for k in ("sink", "slot", "bos_resid", "c_gate"))]
    assert new and all(p.grad is not None and p.grad.abs().max() > 0 for p in new)


def test_bos_as_slot_is_exact_on_a_pythia_style_model(tmp_path):
    """BOS at position 0 as a key/value slot: the parallel residual and the partial rotary (identity at position 0)
    keep the conversion exact, in float64."""
    model = from_pretrained(save(random_neox(seed=15), tmp_path / "neox")).double().eval()
    converted = bos_as_slot(model).eval()
    assert converted.config.parallel_residual and converted.config.rotary_pct == 0.25
    x = torch.randint(1, V, (3, 18), generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        reference = model(torch.cat([torch.zeros_like(x[:, :1]), x], 1))[0][:, 1:]
        assert max_diff(converted(x)[0], reference) <= 1e-10


@pytest.mark.parametrize("field,value", [
    ("attention_bias", False), ("hidden_act", "relu"), ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("hidden_dropout", 0.1), ("attention_dropout", 0.1),
    ("rope_parameters", {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0})])
def test_gpt_neox_fields_we_do_not_implement_are_refused_by_name(tmp_path, field, value):
    folder = save(random_neox(seed=17), tmp_path / "neox")
    config = json.load(open(os.path.join(folder, "config.json")))
    config[field] = value
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(PretrainedError, match=field) as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value)


def test_an_odd_number_of_rotary_channels_is_one_error_line(tmp_path):
    """rotary_pct 0.2 of a head of 16 is 3 channels, which rotary cannot pair."""
    folder = save(random_neox(seed=18), tmp_path / "neox")
    config = json.load(open(os.path.join(folder, "config.json")))
    config["rope_parameters"]["partial_rotary_factor"] = 0.2
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(PretrainedError, match="rotary") as info:
        from_pretrained(folder)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# a Pythia-style folder's tokenizer

PYTHIA_SPECIALS = ["<|endoftext|>", "<|padding|>"]  # ids 0 and 1, as in Pythia's tokenizer.json


def make_pythia_folder(folder):
    """A random GPT-NeoX saved with a byte-level BPE tokenizer.json (trained on Hamlet, Pythia's specials) and a
    tokenizer_config.json naming GPTNeoXTokenizer, as Pythia's folders do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=PYTHIA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([shakespeare_excerpt(24000)], trainer)
    hf = random_neox(seed=19, vocab_size=320)  # Pythia's embedding has more rows than its tokenizer has tokens
    save(hf, folder)
    tokenizer.save(os.path.join(str(folder), "tokenizer.json"))
    with open(os.path.join(str(folder), "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
                   "clean_up_tokenization_spaces": False}, f)
    return str(folder), hf


def test_a_pythia_folder_s_tokenizer_loads_like_the_llama_family_s(tmp_path):
    """load_model reads the folder's tokenizer.json through the tokenizers library, as for SmolLM2: ids and text equal
    transformers' AutoTokenizer, BOS is the folder's (0), and greedy text equals transformers' generate."""
    from transformers import AutoTokenizer
    from sinkgpt.checkpoint import load_model
    from sinkgpt.tokenizer import load_tokenizer
    folder, hf = make_pythia_folder(tmp_path / "pythia")
    loaded = load_model(folder)
    assert loaded.meta["tokenizer"] == "hf" and loaded.meta["bos_token"] == 0
    assert loaded.model.config.vocab_size == 320 and loaded.meta["vocab_size"] == 300
    ours, theirs = load_tokenizer(loaded.meta), AutoTokenizer.from_pretrained(folder)
    for text in ["Hello, world", "  two leading spaces\tand\nnew lines  ", "naïve café 日本語 🙂",
                 "<|endoftext|>O Romeo, Romeo! wherefore art thou Romeo?"]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids) == text, text
    prompt = torch.tensor([[0] + ours.encode("To be, or not")])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(loaded.model.generate(prompt, 8, temperature=0), expected)
