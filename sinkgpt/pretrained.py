"""
Pretrained weights in and out: Hugging Face folders (config.json + safetensors, sharded or not) into a GPT,
and a GPT back out as a folder transformers loads. The families, told apart by config.json's model_type: GPT-2
(GPT2LMHeadModel), Llama (LlamaForCausalLM: SmolLM2, TinyLlama, Llama-2/3-style checkpoints), Mistral
(MistralForCausalLM: Llama with a sliding window), Qwen2 (Qwen2ForCausalLM: Llama with q/k/v biases, sliding
windows on some layers) and GPT-NeoX (GPTNeoXForCausalLM: Pythia).

    model = from_pretrained("path/to/SmolLM2", sink="logit")   # new sink parameters start at their neutral point
    export_hf(model, "out/hf")                                 # config.json + model.safetensors
    convert_gguf("model.gguf", "out/folder")                   # a GGUF file as a float32 folder (transformers)

A config field that changes the computation in a way our model does not implement is refused with one line
naming the field and its value (PretrainedError); the fields that only describe the checkpoint (dtype,
use_cache, token ids, ...) are read or passed over.

May import: model, sinkgpt.common, sinkgpt.tokenizer.
"""

import contextlib
import json
import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from model import GPT, GPTConfig, LayerNorm, is_sink_parameter
from sinkgpt.common import InputError
from sinkgpt.tokenizer import offline_forced, special_ids

# the weight files of a folder, in the order they are looked for
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu": "gelu_exact"}  # transformers' GPT-2 activation_function -> mlp_act
GPT2_CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # stored (in, out) by transformers' Conv1D


class PretrainedError(InputError):
    """A pretrained folder that cannot be read, or a field our model does not implement."""


def is_new_parameter(name):
    """Parameters a pretrained checkpoint does not have: the sink mechanisms', the gate's, QK-norm's."""
    return is_sink_parameter(name) or any(part in name for part in ("c_gate", "q_norm", "k_norm"))


# ----------------------------------------------------------------------------------------------------
# reading a folder


def resolve_folder(name_or_dir, revision=None):
    """A local folder, or a hub name fetched when the hub is reachable (at `revision`: a branch, tag or commit,
    such as Pythia's training steps 'step1000'; None = the default branch)."""
    if os.path.isdir(name_or_dir) and revision is None:
        return name_or_dir
    if os.path.isdir(name_or_dir):
        raise PretrainedError(f"{name_or_dir} is a local folder: a revision ({revision!r}) applies to hub names only")
    return download(name_or_dir, revision)


def download(name, revision=None):
    """Fetch a checkpoint from the Hugging Face hub (needs network) and return its local folder; with
    SINKGPT_OFFLINE=1 (or HF_HUB_OFFLINE=1) only the local Hugging Face cache is read, where a branch or tag
    name is resolved through the cache's refs/ files."""
    try:
        from huggingface_hub import snapshot_download
        fetch = dict(repo_id=name, revision=revision, local_files_only=offline_forced())
        folder = snapshot_download(**fetch, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                                            "tokenizer.json", "tokenizer_config.json"])
        if not any(os.path.exists(os.path.join(folder, file)) for file in WEIGHT_FILES):  # a revision saved before
            folder = snapshot_download(**fetch, allow_patterns=[WEIGHT_FILES[2]])  # safetensors: the legacy file
        return folder
    except Exception as e:  # no network, unknown name or revision, missing package
        if revision is not None:
            raise PretrainedError(f"revision {revision!r} of {name!r} could not be fetched from the hub nor found "
                                  f"in the local cache ({type(e).__name__}): does it exist?") from None
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


class LazyWeights(Mapping):
    """A folder's safetensors weights by name, each read from its file when asked for: loading holds one
    tensor at a time instead of a float32 copy of the whole model, and a shard's file is closed (its memory map
    released) once every tensor it holds has been read, so a sharded folder loads shard by shard."""

    def __init__(self, files):
        self.files = files  # name -> the .safetensors file that holds it
        self.unread = {}  # file -> names not read yet
        for name, file in files.items():
            self.unread.setdefault(file, set()).add(name)
        self.open = {}

    def __getitem__(self, name):
        from safetensors import safe_open
        file = self.files[name]
        if file not in self.open:
            self.open[file] = safe_open(file, framework="pt", device="cpu")
        tensor = self.open[file].get_tensor(name)
        self.unread[file].discard(name)
        if not self.unread[file]:
            del self.open[file]
        return tensor

    def __iter__(self):
        return iter(self.files)

    def __len__(self):
        return len(self.files)


def read_hf_weights(path):
    """The weights of a folder by name: model.safetensors or the shards listed by model.safetensors.index.json
    (read lazily, LazyWeights), or the legacy pytorch_model.bin (read whole)."""
    from safetensors import safe_open
    safetensors_file = os.path.join(path, WEIGHT_FILES[0])
    if os.path.exists(safetensors_file):
        with safe_open(safetensors_file, framework="pt") as f:
            return LazyWeights(dict.fromkeys(f.keys(), safetensors_file))
    index_file = os.path.join(path, WEIGHT_FILES[1])
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({s for s in weight_map.values() if not os.path.exists(os.path.join(path, s))})
        if missing:
            raise PretrainedError(f"{path}: shard {missing[0]} (listed in model.safetensors.index.json) is missing")
        return LazyWeights({name: os.path.join(path, shard) for name, shard in weight_map.items()})
    bin_file = os.path.join(path, WEIGHT_FILES[2])
    if os.path.exists(bin_file):
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise PretrainedError(f"{path} holds neither model.safetensors (or its sharded index) nor pytorch_model.bin")


def refuse_unimplemented(hf, path, checks):
    """checks: field -> (the value we implement, whether a missing field means it). One line for the first
    field that is set to anything else."""
    for field, (implemented, missing_ok) in checks.items():
        if field not in hf:
            if not missing_ok:
                raise PretrainedError(f"{path}/config.json: {field} is missing")
            continue
        if hf[field] != implemented and not (implemented is None and hf[field] in (None, {}, [])):
            raise PretrainedError(f"{path}/config.json: {field}={hf[field]!r} is not implemented "
                                  f"(only {implemented!r})")


def from_pretrained(name_or_dir, dtype=torch.float32, device="cpu", revision=None, **overrides):
    """A GPT with the weights of a Hugging Face folder (or hub name, at `revision`), built straight on `device`
    in `dtype` (no float32 copy of the model on the CPU first; the weights are read one tensor at a time).
    `overrides` set options such as sink or dropout; new parameters start as close to the pretrained model as
    their mechanism allows (GPT.init_sinks_from_pretrained)."""
    path = resolve_folder(name_or_dir, revision)
    hf = read_hf_config(path)
    model_type = hf.get("model_type", "gpt2")
    if model_type not in FAMILIES:
        raise PretrainedError(f"{path}: model_type {model_type!r} is not one of {', '.join(FAMILIES)}")
    make_config, load_state_dict = FAMILIES[model_type]
    try:  # a setting our model refuses (GPTConfig's checks) is one line too
        config = make_config(hf, path)
        for key, value in overrides.items():
            setattr(config, key, value)
        config.block_size -= config.pos_offset  # the folder's positions hold pos_offset fewer real tokens
        config.__post_init__()
    except ValueError as e:
        raise PretrainedError(f"{path}: {e}") from None
    with torch.device(device), default_dtype(dtype):
        model = GPT(config)
    with torch.no_grad():
        load_state_dict(model, read_hf_weights(path))
    model.init_sinks_from_pretrained()
    return model


@contextlib.contextmanager
def default_dtype(dtype):
    """New floating-point tensors in `dtype` inside the block (a model's parameters are made in it at once)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def copy_weight(target, src, key):
    if src.shape != target.shape:
        raise PretrainedError(f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(target.shape)}")
    target.copy_(src)


def copy_embedding(target, src, vocab_size, key):
    """wte / an untied head: the checkpoint's rows, zeros in the padding rows of pad_vocab."""
    if src.shape != (vocab_size, target.size(1)):
        raise PretrainedError(f"weight {key!r} has shape {tuple(src.shape)}, expected ({vocab_size}, {target.size(1)})")
    target[:vocab_size].copy_(src)
    target[vocab_size:].zero_()


# ----------------------------------------------------------------------------------------------------
# GPT-2


def gpt2_config(hf, path):
    refuse_unimplemented(hf, path, {"scale_attn_by_inverse_layer_idx": (False, True),
                                    "scale_attn_weights": (True, True), "add_cross_attention": (False, True)})
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise PretrainedError(f"{path}/config.json: activation_function={activation!r} is not implemented "
                              f"(one of {', '.join(HF_ACTIVATIONS)})")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, mlp_act=HF_ACTIVATIONS[activation],
                     mlp_hidden=hf.get("n_inner") or 0, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     tie_embeddings=hf.get("tie_word_embeddings", True),
                     bos_token=50256 if hf.get("bos_token_id") is None else hf["bos_token_id"])


def load_gpt2_state_dict(model, hf_sd):
    """Copy a GPT2LMHeadModel state dict in; its Conv1D weights are (in, out), so they are transposed."""
    names = {k.removeprefix("transformer."): k for k in hf_sd}  # names only: the weights are read one at a time
    V = model.config.vocab_size
    for name, target in model.state_dict().items():
        key = name.removeprefix("transformer.")
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        if key not in names:
            if is_new_parameter(name):
                continue
            raise PretrainedError(f"weight {key!r} is missing from the GPT-2 checkpoint")
        src = hf_sd[names[key]]
        if key.endswith(GPT2_CONV1D):
            src = src.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            copy_embedding(target, src, V, key)
        else:
            copy_weight(target, src, key)


def exported_tensors(model):
    """(name, float32 CPU tensor) of each weight an export writes: the embedding and head cut to the vocabulary
    (pad_vocab's rows left out), no head where it is tied to the embedding."""
    cfg = model.config
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        tensor = tensor.detach().float().cpu()
        yield name, tensor[:cfg.vocab_size] if name in ("transformer.wte.weight", "lm_head.weight") else tensor


def zero_biases(model):
    """{'<module>.bias': zeros} for each linear and norm without a bias, for formats that always have one."""
    return {f"{name}.bias": torch.zeros(module.weight.shape[0]) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, LayerNorm)) and name != "lm_head" and module.bias is None}


def gpt2_export(model):
    """(state dict, config.json) of a GPT2LMHeadModel."""
    cfg = model.config
    V = cfg.vocab_size
    out = {}
    for name, tensor in exported_tensors(model):
        out[name] = (tensor.t() if name.endswith(GPT2_CONV1D) else tensor).contiguous()
    out.update(zero_biases(model))  # GPT-2 always has biases: zeros are exact
    hf_config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=V,
                     n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_inner=cfg.mlp_hidden or None,
                     activation_function={v: k for k, v in HF_ACTIVATIONS.items()}[cfg.mlp_act],
                     layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                     attn_pdrop=cfg.dropout, initializer_range=0.02, bos_token_id=cfg.bos_token,
                     eos_token_id=cfg.bos_token, tie_word_embeddings=cfg.tie_embeddings)
    return out, hf_config


# ----------------------------------------------------------------------------------------------------
# Llama (LlamaForCausalLM): rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases; and the
# families with Llama's weight names: Mistral (a sliding window) and Qwen2 (q/k/v biases, windows on some layers)


def rope_settings(hf, path, theta_field="rope_theta", pct_field=None, default_pct=1.0):
    """(rotary base, fraction of each head that rotates): from rope_parameters (transformers 5), else from the
    family's own fields of transformers 4 (rope_theta; GPT-NeoX's rotary_emb_base and rotary_pct). Only the
    default rotary embedding (no scaling) is implemented."""
    theta = float(hf.get(theta_field, 10000.0))
    pct = float(hf.get(pct_field, default_pct)) if pct_field else default_pct
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        extra = set(params) - {"rope_theta", "rope_type", "partial_rotary_factor"}
        if params.get("rope_type", "default") != "default" or extra:
            raise PretrainedError(f"{path}/config.json: rope_parameters={params!r} is not implemented (only the "
                                  "default rotary embedding, without scaling)")
        theta = float(params.get("rope_theta", theta))
        pct = float(params.get("partial_rotary_factor", pct))
    return theta, pct


def llama_style_config(hf, path, **keys):
    """The GPTConfig of a Llama-style folder (Llama, Mistral, Qwen2: rotary, RMSNorm, SwiGLU, grouped-query
    attention), with the family's own `keys` (biases, windows) on top."""
    refuse_unimplemented(hf, path, {"hidden_act": ("silu", True), "rope_scaling": (None, True),
                                    "attention_dropout": (0.0, True)})
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    if head_dim * n_head != hf["hidden_size"]:
        raise PretrainedError(f"{path}/config.json: head_dim={head_dim} is not implemented (only hidden_size / "
                              f"num_attention_heads = {hf['hidden_size'] // n_head})")
    theta, pct = rope_settings(hf, path)
    if pct != 1.0:
        raise PretrainedError(f"{path}/config.json: partial_rotary_factor={pct} is not implemented for "
                              f"{hf.get('model_type')!r} (only 1.0)")
    bos, _ = special_ids(hf)
    return GPTConfig(**dict(dict(
        block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"], bias=False, pos_emb="rope", rope_base=theta, norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp_act="swiglu", mlp_hidden=hf["intermediate_size"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bos_token=0 if bos is None else bos), **keys))


def llama_config(hf, path):
    refuse_unimplemented(hf, path, {"sliding_window": (None, True), "use_sliding_window": (False, True)})
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise PretrainedError(f"{path}/config.json: attention_bias={hf.get('attention_bias', False)!r} with "
                              f"mlp_bias={hf.get('mlp_bias', False)!r} is not implemented (one bias switch for both)")
    return llama_style_config(hf, path, bias=bool(hf.get("attention_bias", False)))


def mistral_config(hf, path):
    """Mistral: Llama whose every layer attends to the last sliding_window positions (attn_window; null = all).
    Like transformers' MistralForCausalLM, it reads no layer_types (Ministral's alternating layers)."""
    return llama_style_config(hf, path, attn_window=window_size(hf, path))


def qwen2_config(hf, path):
    """Qwen2: Llama with biases on the query, key and value projections only (qkv_bias), and with
    use_sliding_window, a window on the layers layer_types names sliding_attention (by default those from
    max_window_layers on, as transformers derives them)."""
    windows = 0
    if hf.get("use_sliding_window", False):
        size = window_size(hf, path)
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if hf.get("sliding_window") and layer >= hf.get("max_window_layers", 28)
            else "full_attention" for layer in range(hf["num_hidden_layers"])]
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown or len(layer_types) != hf["num_hidden_layers"] or (
                hf.get("sliding_window") is None and "sliding_attention" in layer_types):
            raise PretrainedError(f"{path}/config.json: layer_types={layer_types!r} is not implemented (one "
                                  "'sliding_attention' or 'full_attention' per layer, with a sliding_window)")
        windows = [size if kind == "sliding_attention" else 0 for kind in layer_types]
        windows = windows[0] if len(set(windows)) == 1 else windows
    elif "sliding_attention" in (hf.get("layer_types") or []):
        raise PretrainedError(f"{path}/config.json: layer_types names sliding_attention with use_sliding_window="
                              f"{hf.get('use_sliding_window')!r} (no window to apply): not implemented")
    return llama_style_config(hf, path, qkv_bias=True, attn_window=windows)


def window_size(hf, path):
    """sliding_window of a config.json as attn_window: a positive int, or 0 for none (null), and for a window that
    holds the whole context (max_position_embeddings), which hides nothing."""
    size = hf.get("sliding_window")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise PretrainedError(f"{path}/config.json: sliding_window={size!r} is not implemented (a positive "
                              "number of positions, or null)")
    return 0 if size is None or size >= hf.get("max_position_embeddings", 2048) else size


# our parameter -> the LlamaForCausalLM parameters it is made of (concatenated along dim 0), per layer
LLAMA_LAYER = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "attn.c_proj": ("self_attn.o_proj",), "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
               "mlp.c_proj": ("mlp.down_proj",), "ln_1": ("input_layernorm",), "ln_2": ("post_attention_layernorm",)}


def llama_sources(name):
    """The Llama keys our parameter `name` is built from, or None for one a Llama checkpoint does not have."""
    if name == "transformer.wte.weight":
        return ("model.embed_tokens.weight",)
    if name == "transformer.ln_f.weight":
        return ("model.norm.weight",)
    if name == "lm_head.weight":
        return ("lm_head.weight",)
    parts = name.split(".")  # transformer.h.<i>.<module path>.<weight|bias>
    if parts[:2] == ["transformer", "h"]:
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module in LLAMA_LAYER:
            return tuple(f"model.layers.{parts[2]}.{src}.{leaf}" for src in LLAMA_LAYER[module])
    return None


def load_llama_state_dict(model, hf_sd):
    """Copy a Llama-style state dict in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM: the same names)."""
    V = model.config.vocab_size
    for name, target in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        sources = llama_sources(name)
        if sources is None:
            if is_new_parameter(name):
                continue
            raise PretrainedError(f"our parameter {name!r} has no counterpart in a Llama-style checkpoint")
        missing = [key for key in sources if key not in hf_sd]
        if missing:
            raise PretrainedError(f"weight {missing[0]!r} is missing from the Llama-style checkpoint")
        src = torch.cat([hf_sd[key] for key in sources]) if len(sources) > 1 else hf_sd[sources[0]]
        if name in ("transformer.wte.weight", "lm_head.weight"):
            copy_embedding(target, src, V, sources[0])
        else:
            copy_weight(target, src, " + ".join(sources))


def llama_export(model, family="llama"):
    """(state dict, config.json) of a LlamaForCausalLM, or of the Llama-style family `family` (qwen2: zero
    query/key/value biases where the model has none, which is exact)."""
    cfg = model.config
    out = {}
    for name, tensor in exported_tensors(model):
        sources = llama_sources(name)
        if len(sources) == 1:
            out[sources[0]] = tensor.contiguous()
            continue
        D, Hkv = cfg.head_size, cfg.kv_heads
        sizes = [cfg.n_embd, Hkv * D, Hkv * D] if name.endswith(("c_attn.weight", "c_attn.bias")) else [cfg.hidden_size] * 2
        for key, piece in zip(sources, tensor.split(sizes)):
            out[key] = piece.contiguous()
    hf_config = dict(architectures=[LLAMA_STYLE[family]], model_type=family, vocab_size=cfg.vocab_size,
                     hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_size, num_hidden_layers=cfg.n_layer,
                     num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size,
                     hidden_act="silu", max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                     rope_theta=cfg.rope_base, rope_scaling=None, attention_dropout=0.0,
                     tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token,
                     eos_token_id=cfg.bos_token, initializer_range=0.02, torch_dtype="float32")
    windows = cfg.layer_windows()
    if family == "llama":
        hf_config.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if family == "mistral":
        hf_config.update(sliding_window=windows[0])
    if family == "qwen2":  # the windowed layers by name, all of one size
        hf_config.update(use_sliding_window=any(windows), sliding_window=max(windows) or None,
                         layer_types=["sliding_attention" if w else "full_attention" for w in windows])
        if not cfg.qkv_bias:  # Qwen2 always has these biases
            for layer in range(cfg.n_layer):
                for proj, width in (("q_proj", cfg.n_embd), ("k_proj", cfg.kv_heads * cfg.head_size),
                                    ("v_proj", cfg.kv_heads * cfg.head_size)):
                    out[f"model.layers.{layer}.self_attn.{proj}.bias"] = torch.zeros(width)
    return out, hf_config


# ----------------------------------------------------------------------------------------------------
# GPT-NeoX (GPTNeoXForCausalLM: Pythia): rotary on part of each head, attention and MLP in parallel,
# LayerNorm and biases everywhere, untied output embedding (embed_out)


def gpt_neox_config(hf, path):
    refuse_unimplemented(hf, path, {"attention_bias": (True, True), "rope_scaling": (None, True),
                                    "attention_dropout": (0.0, True), "hidden_dropout": (0.0, True),
                                    "add_cross_attention": (False, True)})
    activation = hf.get("hidden_act", "gelu")
    if activation not in HF_ACTIVATIONS:
        raise PretrainedError(f"{path}/config.json: hidden_act={activation!r} is not implemented "
                              f"(one of {', '.join(HF_ACTIVATIONS)})")
    # transformers reads a missing rotary_pct as 0.25 (GPT-NeoX-20B's and Pythia's)
    theta, pct = rope_settings(hf, path, theta_field="rotary_emb_base", pct_field="rotary_pct", default_pct=0.25)
    bos, _ = special_ids(hf)
    return GPTConfig(block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                     n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                     bias=True, pos_emb="rope", rope_base=theta, rotary_pct=pct,
                     parallel_residual=bool(hf.get("use_parallel_residual", True)),
                     norm_eps=float(hf.get("layer_norm_eps", 1e-5)), mlp_act=HF_ACTIVATIONS[activation],
                     mlp_hidden=hf["intermediate_size"], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                     bos_token=0 if bos is None else bos)


# our module -> GPTNeoXForCausalLM's, per layer
GPT_NEOX_LAYER = {"attn.c_attn": "attention.query_key_value", "attn.c_proj": "attention.dense",
                  "mlp.c_fc": "mlp.dense_h_to_4h", "mlp.c_proj": "mlp.dense_4h_to_h", "ln_1": "input_layernorm",
                  "ln_2": "post_attention_layernorm"}


def gpt_neox_source(name, head_name="embed_out.weight"):
    """The GPT-NeoX key of our parameter `name`, or None for one a GPT-NeoX checkpoint does not have. The output
    embedding is embed_out in the original checkpoints (Pythia's), lm_head in those transformers 5 writes."""
    if name == "transformer.wte.weight":
        return "gpt_neox.embed_in.weight"
    if name.startswith("transformer.ln_f."):
        return "gpt_neox.final_layer_norm." + name.rsplit(".", 1)[1]
    if name == "lm_head.weight":
        return head_name
    parts = name.split(".")  # transformer.h.<i>.<module path>.<weight|bias>
    module = ".".join(parts[3:-1])
    if parts[:2] == ["transformer", "h"] and module in GPT_NEOX_LAYER:
        return f"gpt_neox.layers.{parts[2]}.{GPT_NEOX_LAYER[module]}.{parts[-1]}"
    return None


def neox_qkv_order(tensor, n_head, to_neox):
    """GPT-NeoX's fused query_key_value rows go head by head, [h0 q, k, v, h1 q, k, v, ...]; ours are all
    queries, then all keys, then all values. Reorders a weight (rows, C) or a bias (rows,) either way."""
    D = tensor.shape[0] // (3 * n_head)
    grouped = tensor.reshape(3, n_head, D, *tensor.shape[1:]) if to_neox else \
        tensor.reshape(n_head, 3, D, *tensor.shape[1:])
    return grouped.transpose(0, 1).reshape(tensor.shape)


def load_gpt_neox_state_dict(model, hf_sd):
    cfg = model.config
    head_name = "embed_out.weight" if "embed_out.weight" in hf_sd else "lm_head.weight"
    for name, target in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        key = gpt_neox_source(name, head_name)
        if key is None:
            if is_new_parameter(name):
                continue
            raise PretrainedError(f"our parameter {name!r} has no counterpart in a GPT-NeoX checkpoint")
        if key not in hf_sd:
            raise PretrainedError(f"weight {key!r} is missing from the GPT-NeoX checkpoint")
        src = hf_sd[key]
        if name.endswith(("c_attn.weight", "c_attn.bias")):
            if src.shape != target.shape:
                raise PretrainedError(f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(target.shape)}")
            src = neox_qkv_order(src, cfg.n_head, to_neox=False)
        if name in ("transformer.wte.weight", "lm_head.weight"):
            copy_embedding(target, src, cfg.vocab_size, key)
        else:
            copy_weight(target, src, key)


def gpt_neox_export(model):
    """(state dict, config.json) of a GPTNeoXForCausalLM. A model without biases gets zero biases (exact)."""
    cfg = model.config
    out = {}
    for name, tensor in exported_tensors(model):
        if name.endswith(("c_attn.weight", "c_attn.bias")):
            tensor = neox_qkv_order(tensor, cfg.n_head, to_neox=True)
        out[gpt_neox_source(name)] = tensor.contiguous()
    out.update({gpt_neox_source(name): zeros for name, zeros in zero_biases(model).items()})
    hf_config = dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", vocab_size=cfg.vocab_size,
                     hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_size, num_hidden_layers=cfg.n_layer,
                     num_attention_heads=cfg.n_head,
                     hidden_act={v: k for k, v in HF_ACTIVATIONS.items()}[cfg.mlp_act],
                     max_position_embeddings=cfg.block_size, layer_norm_eps=cfg.norm_eps,
                     rotary_emb_base=cfg.rope_base, rotary_pct=cfg.rotary_pct,
                     rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_base,
                                          partial_rotary_factor=cfg.rotary_pct),
                     use_parallel_residual=cfg.parallel_residual, attention_bias=True, attention_dropout=0.0,
                     hidden_dropout=0.0, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_token,
                     eos_token_id=cfg.bos_token, initializer_range=0.02, torch_dtype="float32")
    return out, hf_config


# model_type -> (its GPTConfig, the loader of its weights)
FAMILIES = {"gpt2": (gpt2_config, load_gpt2_state_dict), "llama": (llama_config, load_llama_state_dict),
            "mistral": (mistral_config, load_llama_state_dict), "qwen2": (qwen2_config, load_llama_state_dict),
            "gpt_neox": (gpt_neox_config, load_gpt_neox_state_dict)}
LLAMA_STYLE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


# ----------------------------------------------------------------------------------------------------
# export


def export_family(cfg):
    """The Hugging Face family that holds a model, with the settings it cannot express: 'llama', 'mistral' or
    'qwen2' for rotary / RMSNorm / SwiGLU models (llama_style_family), 'gpt_neox' for rotary / LayerNorm / GELU
    ones, else 'gpt2'."""
    defaults = GPTConfig()
    unsupported = [key for key in ("sink", "attn_gate", "attn_fn", "norm_pos", "qk_norm", "logit_softcap",
                                   "pos_offset") if getattr(cfg, key) != getattr(defaults, key)]
    if (cfg.pos_emb, cfg.norm, cfg.mlp_act) == ("rope", "rmsnorm", "swiglu"):
        family, window_refused = llama_style_family(cfg)
        return family, unsupported + window_refused + [key for key in ("parallel_residual", "rotary_pct")
                                                       if getattr(cfg, key) != getattr(defaults, key)]
    if any(cfg.layer_windows()):
        unsupported.append("attn_window")
    if cfg.kv_heads != cfg.n_head:
        unsupported.append("n_kv_head")
    if cfg.mlp_act not in HF_ACTIVATIONS.values():
        unsupported.append("mlp_act")
    if (cfg.pos_emb, cfg.norm) == ("rope", "layernorm"):
        return "gpt_neox", unsupported
    unsupported += [key for key in ("pos_emb", "norm", "parallel_residual")
                    if getattr(cfg, key) != getattr(defaults, key)]
    return "gpt2", unsupported


def llama_style_family(cfg):
    """Which of Llama, Mistral (one window on every layer) and Qwen2 (q/k/v biases only; a window on some
    layers) holds a rotary / RMSNorm / SwiGLU model, with ['attn_window'] when none holds its windows."""
    windows = cfg.layer_windows()
    if cfg.bias:  # Llama's attention_bias and mlp_bias: a family without windows
        return "llama", ["attn_window"] if any(windows) else []
    if len(set(windows) - {0}) > 1:  # Hugging Face's families have one window size per model
        return "qwen2", ["attn_window"]
    if not any(windows):
        return ("qwen2" if cfg.qkv_bias else "llama"), []
    return ("mistral" if all(windows) and not cfg.qkv_bias else "qwen2"), []


# the family's name in error lines, and its writer
EXPORTERS = {"gpt2": ("GPT-2", gpt2_export), "llama": ("Llama", llama_export),
             "mistral": ("Mistral", lambda model: llama_export(model, "mistral")),
             "qwen2": ("Qwen2", lambda model: llama_export(model, "qwen2")), "gpt_neox": ("GPT-NeoX", gpt_neox_export)}


def export_hf(model, out_dir, meta=None):
    """Write config.json + model.safetensors that transformers loads: LlamaForCausalLM for rotary / RMSNorm /
    SwiGLU models (MistralForCausalLM with one window on every layer, Qwen2ForCausalLM with q/k/v biases only or
    windows on some layers), GPTNeoXForCausalLM for rotary / LayerNorm / GELU
    ones, GPT2LMHeadModel otherwise. Settings the format cannot express are refused, naming them. With
    the tokenizer description `meta` (a checkpoint's), the folder gets its tokenizer: tokenizer.json for an 'hf'
    one, meta.json for a character vocabulary (GPT-2 BPE needs none)."""
    family, unsupported = export_family(model.config)
    label, write = EXPORTERS[family]
    if unsupported:
        raise PretrainedError(f"the Hugging Face {label} format cannot express "
                              + ", ".join(f"{k}={getattr(model.config, k)!r}" for k in unsupported))
    from safetensors.torch import save_file
    weights, hf_config = write(model)
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if meta and meta.get("tokenizer") == "hf":
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(meta["tokenizer_json"])
    elif meta and meta.get("tokenizer") == "char":
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)


# ----------------------------------------------------------------------------------------------------
# GGUF


def convert_gguf(gguf_path, out_dir):
    """A GGUF checkpoint as a Hugging Face folder (config.json, model.safetensors in float32, tokenizer.json):
    transformers reads and dequantises it (with the gguf package). Its GGUF-loaded model is marked as quantised,
    so save_pretrained refuses it although its weights are plain float32 by then: the folder is written from its
    state dict and config instead. Returns the transformers model (for verification)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config.update(architectures=[type(model).__name__], torch_dtype="float32")
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))}
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(out_dir)
    return model
