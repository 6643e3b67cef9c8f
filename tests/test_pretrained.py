"""sinkgpt.pretrained: Hugging Face GPT-2 folders in (safetensors, pytorch_model.bin, untied heads, activations,
overrides) and out (export_hf round trips through transformers, and refuses what GPT-2 cannot express)."""
import json
import os

import pytest
import torch

from conftest import HF_BOS, HF_VOCAB, idx_batch, randomize, random_gpt2, tiny
from sinkgpt.pretrained import PretrainedError, export_hf, from_pretrained


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
    model = from_pretrained(hf_dir).eval()
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
    model = from_pretrained(str(tmp_path)).eval()
    idx = hf_input()
    with torch.no_grad():
        logits, _ = model(idx)
    assert (logits - hf_logits(hf_gpt2, idx)).abs().max().item() <= 1e-5


def test_from_pretrained_untied_head_and_missing_weights_or_files(tmp_path):
    hf = random_gpt2(seed=3, tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    hf.save_pretrained(str(tmp_path / "untied"))
    model = from_pretrained(str(tmp_path / "untied")).eval()
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
    with pytest.raises(PretrainedError, match="h.1.mlp.c_fc.weight"):
        from_pretrained(str(tmp_path / "untied"))
    os.makedirs(tmp_path / "empty")
    with open(tmp_path / "empty" / "config.json", "w") as f:
        json.dump(hf.config.to_dict(), f)
    with pytest.raises(PretrainedError, match="safetensors"):
        from_pretrained(str(tmp_path / "empty"))


def test_from_pretrained_reads_the_activation_function(tmp_path):
    # GPT-2 proper uses "gelu_new" (tanh); "gelu" is the exact erf GELU; other activations are refused by name
    exact = random_gpt2(seed=4, activation_function="gelu")
    exact.save_pretrained(str(tmp_path / "exact"))
    model = from_pretrained(str(tmp_path / "exact")).eval()
    assert model.config.mlp_act == "gelu_exact"
    idx = hf_input()
    with torch.no_grad():
        logits = model(idx)[0]
        tanh_logits = from_pretrained(str(tmp_path / "exact"), mlp_act="gelu").eval()(idx)[0]
    expected = hf_logits(exact, idx)
    assert (logits - expected).abs().max().item() <= 1e-5
    assert (tanh_logits - expected).abs().max().item() > 1e-4  # the two GELUs are told apart
    random_gpt2(seed=4, activation_function="relu").save_pretrained(str(tmp_path / "relu"))
    with pytest.raises(PretrainedError, match="activation_function='relu'"):
        from_pretrained(str(tmp_path / "relu"))


def test_from_pretrained_pad_vocab_and_overrides(hf_dir, hf_gpt2):
    model = from_pretrained(hf_dir, pad_vocab=True, dropout=0.1).eval()
    assert model.transformer.wte.weight.shape == (128, 64)
    assert model.config.dropout == 0.1
    assert torch.equal(model.transformer.wte.weight[HF_VOCAB:], torch.zeros(128 - HF_VOCAB, 64))
    idx = hf_input()
    with torch.no_grad():
        logits, _ = model(idx)
    assert logits.shape == (3, 32, HF_VOCAB)
    assert (logits - hf_logits(hf_gpt2, idx)).abs().max().item() <= 1e-5
    with pytest.raises(PretrainedError, match="sink"):
        from_pretrained(hf_dir, sink="bogus")


def export_and_reload(model, out_dir):
    from transformers import GPT2LMHeadModel
    export_hf(model, str(out_dir))
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
    again = from_pretrained(str(tmp_path / "export"), pad_vocab=model.config.pad_vocab).eval()
    assert again.config.mlp_act == model.config.mlp_act
    with torch.no_grad():
        assert (again(idx)[0] - ours).abs().max().item() <= 1e-6


@pytest.mark.parametrize("key,value", [("sink", "logit"), ("sink", "token"), ("sink", "bos_override"),
                                       ("attn_gate", "headwise"), ("attn_fn", "sigmoid"), ("parallel_residual", True),
                                       ("pos_emb", "none"), ("norm", "rmsnorm"), ("norm_pos", "post"),
                                       ("qk_norm", True), ("mlp_act", "swiglu"), ("logit_softcap", 30.0)])
def test_export_hf_refuses_what_gpt2_cannot_express(tmp_path, key, value):
    model = tiny(**{key: value})
    with pytest.raises(PretrainedError, match=key):
        export_hf(model, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("field,value", [("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                                         ("add_cross_attention", True), ("activation_function", "relu")])
def test_gpt2_fields_we_do_not_implement_are_refused_by_name(tmp_path, field, value):
    """Before, the first two loaded silently and gave logits off by 1.6 and 5.0 on a small random model."""
    random_gpt2(seed=5, **{field: value}).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(PretrainedError, match=field) as info:
        from_pretrained(str(tmp_path / "gpt2"))
    assert "\n" not in str(info.value)


def test_gpt2_layer_norm_epsilon_and_n_inner_are_read(tmp_path):
    """Both were ignored before (an epsilon of 1e-1 gave logits off by 0.9): now norm_eps and mlp_hidden."""
    hf = random_gpt2(seed=6, layer_norm_epsilon=1e-1, n_inner=100)
    hf.save_pretrained(str(tmp_path / "gpt2"))
    model = from_pretrained(str(tmp_path / "gpt2")).eval()
    assert model.config.norm_eps == 1e-1 and model.config.hidden_size == 100
    idx = hf_input()
    with torch.no_grad():
        assert (model(idx)[0] - hf_logits(hf, idx)).abs().max().item() <= 1e-5
    export_hf(model, str(tmp_path / "out"))
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["layer_norm_epsilon"] == 1e-1 and config["n_inner"] == 100
