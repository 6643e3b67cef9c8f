"""
Pretrained weights in and out: Hugging Face folders (config.json + safetensors) into a GPT, and a GPT back
out as a folder transformers loads.

    model = from_pretrained("path/to/gpt2", sink="logit")   # new sink parameters start at their neutral point
    export_hf(model, "out/hf")                              # config.json + model.safetensors

A config field the model does not implement, with a value other than the one it does, is refused with one
line naming the field (PretrainedError).

May import: model, sinkgpt.common.
"""

import json
import os

import torch
import torch.nn as nn

from model import GPT, GPTConfig, LayerNorm, is_sink_parameter
from sinkgpt.common import InputError

HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu": "gelu_exact"}  # transformers' GPT-2 activation_function -> mlp_act
GPT2_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # stored (in, out) by transformers' Conv1D


class PretrainedError(InputError):
    """A pretrained folder that cannot be read, or a field our model does not implement."""


def is_new_parameter(name):
    """Parameters a pretrained checkpoint does not have: the sink mechanisms', the gate's, QK-norm's."""
    return is_sink_parameter(name) or any(part in name for part in ("c_gate", "q_norm", "k_norm"))


# ----------------------------------------------------------------------------------------------------
# reading a folder


def resolve_folder(name_or_dir):
    """A local folder, or a hub name fetched when the hub is reachable."""
    return name_or_dir if os.path.isdir(name_or_dir) else download(name_or_dir)


def download(name):
    """Fetch a checkpoint from the Hugging Face hub (needs network); returns its local folder."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # no network, unknown name, missing package
        raise PretrainedError(f"{name!r} is not a local folder and could not be fetched from the hub "
                              f"({type(e).__name__}); pass a folder with config.json and model.safetensors") from None


def read_hf_config(path):
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise PretrainedError(f"{path} has no config.json")
    try:
        with open(config_path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{config_path} is not JSON ({e})") from None


def read_hf_weights(path):
    safetensors_file = os.path.join(path, "model.safetensors")
    if os.path.exists(safetensors_file):
        from safetensors.torch import load_file
        return load_file(safetensors_file)
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise PretrainedError(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def from_pretrained(name_or_dir, **overrides):
    """A GPT with the weights of a Hugging Face folder (or hub name). `overrides` set options such as sink or
    dropout; new parameters start as close to the pretrained model as their mechanism allows
    (GPT.init_sinks_from_pretrained)."""
    path = resolve_folder(name_or_dir)
    hf = read_hf_config(path)
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise PretrainedError(f"{path}: model_type {model_type!r} is not gpt2")
    config = gpt2_config(hf, path)
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        config.__post_init__()
    except ValueError as e:
        raise PretrainedError(str(e)) from None
    model = GPT(config)
    load_gpt2_state_dict(model, read_hf_weights(path))
    model.init_sinks_from_pretrained()
    return model


# ----------------------------------------------------------------------------------------------------
# GPT-2


def gpt2_config(hf, path):
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise PretrainedError(f"{path}: activation_function {activation!r} is not one of {', '.join(HF_ACTIVATIONS)}")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, mlp_act=HF_ACTIVATIONS[activation],
                     tie_embeddings=hf.get("tie_word_embeddings", True),
                     bos_token=50256 if hf.get("bos_token_id") is None else hf["bos_token_id"])


def load_gpt2_state_dict(model, hf_sd):
    """Copy a GPT2LMHeadModel state dict in; its Conv1D weights are (in, out), so they are transposed."""
    hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    V = model.config.vocab_size
    with torch.no_grad():
        for name, target in model.state_dict().items():
            key = name.removeprefix("transformer.")
            if name == "lm_head.weight" and model.config.tie_embeddings:
                continue
            if key not in hf_sd:
                if is_new_parameter(name):
                    continue
                raise PretrainedError(f"weight {key!r} is missing from the GPT-2 checkpoint")
            src = hf_sd[key]
            if key.endswith(GPT2_CONV1D):
                src = src.t()
            if name in ("transformer.wte.weight", "lm_head.weight"):
                target[:V].copy_(src)
                target[V:].zero_()
                continue
            if src.shape != target.shape:
                raise PretrainedError(f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(target.shape)}")
            target.copy_(src)


def export_hf(model, out_dir):
    """Write config.json + model.safetensors that transformers' GPT2LMHeadModel loads."""
    cfg = model.config
    defaults = GPTConfig()
    unsupported = [key for key in ("sink", "attn_gate", "attn_fn", "pos_emb", "norm", "norm_pos", "qk_norm",
                                   "logit_softcap") if getattr(cfg, key) != getattr(defaults, key)]
    if cfg.mlp_act not in HF_ACTIVATIONS.values():
        unsupported.append("mlp_act")
    if unsupported:
        raise PretrainedError("the Hugging Face GPT-2 format cannot express " +
                              ", ".join(f"{k}={getattr(cfg, k)!r}" for k in unsupported))
    from safetensors.torch import save_file
    V = cfg.vocab_size
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.detach().float().cpu()
        if name.endswith(GPT2_CONV1D):
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:V]
        out[name] = tensor.contiguous()
    if not cfg.bias:  # GPT-2 always has biases: zeros are exact
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, LayerNorm)) and name != "lm_head":
                out[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf_config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=V,
                     n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_inner=None,
                     activation_function={v: k for k, v in HF_ACTIVATIONS.items()}[cfg.mlp_act],
                     layer_norm_epsilon=1e-5, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                     attn_pdrop=cfg.dropout, initializer_range=0.02, bos_token_id=cfg.bos_token,
                     eos_token_id=cfg.bos_token, tie_word_embeddings=cfg.tie_embeddings)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
