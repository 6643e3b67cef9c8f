"""
The decode floor (bench.py --generate --decode_floor): what one generated token costs at least on this machine,
timed per token and interleaved with our own decode step. The floors: the matrix-vector products alone (in the
decode layout, and as F.linear runs them), reading every weight once (the memory-bandwidth floor), and, for a
plain Llama-family model, a decode step hand-written with the fewest eager ops (minimal_llama_decoder). What the
measurements showed is in docs/performance.md.

May import: model, sinkgpt.generation, sinkgpt.pretrained, sinkgpt.runtime.
"""

import statistics
import time

import torch
import torch.nn.functional as F

from model import KVCache, apply_rope, rotation
from sinkgpt.generation import decode_layout, row_block_product, row_blocks
from sinkgpt.pretrained import export_family
from sinkgpt.runtime import synchronize



def matvec_calls(model, plain=False):
    """One decode token's matrix-vector products alone, as zero-argument calls: each Linear on a (1, in) vector,
    as the decode calls it (inside decode_layout: on a CPU, the row-block product), or with plain=True as
    F.linear multiplies it (what the layout replaces)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    vectors = [torch.randn(1, m.in_features, dtype=m.weight.dtype, device=m.weight.device) for m in linears]
    if plain:
        return [lambda layer=layer, x=x: F.linear(x, layer.weight, layer.bias) for layer, x in zip(linears, vectors)]
    return [lambda layer=layer, x=x: layer(x) for layer, x in zip(linears, vectors)]


def is_plain_llama(cfg):
    """A model the Llama format holds with nothing refused (export_family), without biases or dropout."""
    return export_family(cfg) == ("llama", []) and not (cfg.bias or cfg.dropout)


def minimal_llama_decoder(model):
    """step(cache, token) -> logits (1, vocab) of the token after `token` (an int), for a plain Llama-family model
    on a CPU (is_plain_llama), written with the fewest eager ops we could: no modules, no hooks, no options, the
    matrices and rotary tables prepared once, queries and keys rotated together, keys and values written in place
    into our KVCache. A measuring stick for how much of our decode step is per-op framework time; nothing
    generates with it."""
    cfg = model.config
    H, Hkv, D, C, eps = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.n_embd, cfg.norm_eps
    cos, sin = rotation(model.rope_cos, model.rope_sin)  # (positions, D) each

    def product(linear):  # x -> x W^T for one row, as the decode layout multiplies it
        weight, parts = linear.weight, row_blocks()
        return lambda x: row_block_product(x, weight, parts)

    layers = [(b.ln_1.weight, product(b.attn.c_attn), product(b.attn.c_proj), b.ln_2.weight, product(b.mlp.c_fc),
               product(b.mlp.c_proj)) for b in model.transformer.h]
    embedding, final_norm, head = model.transformer.wte.weight, model.transformer.ln_f.weight, product(model.lm_head)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def step(cache, token):
        pos = cache.pos
        x = embedding[token].view(1, C)
        for layer, (norm_1, qkv_proj, attn_proj, norm_2, fc_proj, mlp_proj) in enumerate(layers):
            qkv = qkv_proj(rms(x, norm_1))
            qk = qkv[:, :(H + Hkv) * D].view(H + Hkv, D)
            qk = apply_rope(qk, cos[pos], sin[pos])
            keys, values = cache.buffers[layer]  # (1, Hkv, capacity, D) each
            keys[0, :, pos], values[0, :, pos] = qk[H:], qkv[:, (H + Hkv) * D:].view(Hkv, D)
            cache.length[layer] = pos + 1
            scores = qk[:H].view(Hkv, H // Hkv, D) @ keys[0, :, :pos + 1].transpose(-1, -2)  # query groups
            attn = (scores * D ** -0.5).softmax(-1) @ values[0, :, :pos + 1]  # (Hkv, H / Hkv, D)
            x = x + attn_proj(attn.view(1, C))
            gate, up = fc_proj(rms(x, norm_2)).chunk(2, dim=-1)
            x = x + mlp_proj(F.silu(gate) * up)
        cache.pos += 1
        return head(rms(x, final_norm))

    return step


def copied_cache(cache):
    out = KVCache(len(cache.buffers))
    out.buffers = [tuple(t.clone() for t in kv) for kv in cache.buffers]
    out.length, out.pos = list(cache.length), cache.pos
    return out


def decode_floor(model, prompt, rounds):
    """Milliseconds per token, medians of interleaved rounds of up to 16 tokens each, after `prompt`: our decode
    step (one token's forward and argmax, in the decode layout), the minimal Llama step (plain Llama-family
    models on a CPU, else None), the matrix-vector products alone (in the decode layout, and as F.linear runs
    them), and reading every weight once (a sum over each layer's matrix: the memory-bandwidth floor). Also how
    far the minimal step's logits are from ours."""
    cfg = model.config
    steps = min(16, prompt.size(1), cfg.block_size - prompt.size(1))
    minimal = is_plain_llama(cfg) and prompt.device.type == "cpu" and prompt.size(0) == 1
    with torch.inference_mode(), decode_layout(model):
        prefilled = KVCache(cfg.n_layer)
        first = model(prompt, cache=prefilled, last_only=True)[0][:, -1].argmax(-1, keepdim=True)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        matrices = list({m.weight.data_ptr(): m.weight for m in linears}.values())  # what a token reads
        matvecs, plain_matvecs = matvec_calls(model), matvec_calls(model, plain=True)

        def ours(cache, token):
            return model(token, cache=cache)[0][:, -1].argmax(-1, keepdim=True)

        minimal_step = minimal_llama_decoder(model) if minimal else None

        def minimal_argmax(cache, token):
            return minimal_step(cache, token.item()).argmax(-1, keepdim=True)

        def decoding(step):
            def run():
                cache, token = copied_cache(prefilled), first
                synchronize(prompt.device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    token = step(cache, token)
                synchronize(prompt.device)
                return time.perf_counter() - t0
            return run

        def repeated(calls):
            def run():
                synchronize(prompt.device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    for call in calls:
                        call()
                synchronize(prompt.device)
                return time.perf_counter() - t0
            return run

        variants = {"ours": decoding(ours), "minimal_step": decoding(minimal_argmax) if minimal else None,
                    "matvecs": repeated(matvecs), "plain_matvecs": repeated(plain_matvecs),
                    "weight_read": repeated([m.sum for m in matrices])}
        variants = {name: run for name, run in variants.items() if run is not None}
        seconds = {name: [] for name in variants}
        for _ in range(rounds):
            for name, run in variants.items():
                seconds[name].append(run())
        result = {f"{name}_ms": 1e3 * statistics.median(s) / steps for name, s in seconds.items()}
        result.setdefault("minimal_step_ms", None)
        if minimal:
            ours_logits = model(first, cache=copied_cache(prefilled))[0][:, -1]
            own_logits = minimal_step(copied_cache(prefilled), first.item())
            result["minimal_max_logit_diff"] = (ours_logits - own_logits).abs().max().item()
    return dict(tokens=steps, **result)


def floor_lines(floor):
    """bench.py's printed summary of a decode_floor() result."""
    minimal = (f"the minimal Llama step {floor['minimal_step_ms']:.1f} (logits within "
               f"{floor['minimal_max_logit_diff']:.1e} of ours), " if floor["minimal_step_ms"] is not None else "")
    lines = [f"decode floor, ms per token ({floor['tokens']} tokens a round): ours {floor['ours_ms']:.1f}, {minimal}"
             f"the matrix-vector products alone {floor['matvecs_ms']:.1f} (as F.linear runs them "
             f"{floor['plain_matvecs_ms']:.1f}), reading every weight once {floor['weight_read_ms']:.1f}"]
    if "speedup_at_minimal_step" in floor:
        lines.append(f"ours / transformers with the minimal step's ms per token: x{floor['speedup_at_minimal_step']:.2f}")
    return lines
