"""Exactness of every sink mechanism (docs/sinks.md): the attention used in training (the fused fast path, and the
eager path the analysis hooks switch to) against a plain eager reference written here, in float64, for the output
and the gradients; the KV cache against the full forward; cases that show each option really acts; and how
close from_pretrained(..., sink=...) starts to the plain pretrained GPT-2."""
import math

import pytest
import torch

from conftest import HF_BOS, HF_VOCAB
from model import GPT, SLOT_SINKS, CausalSelfAttention, GPTConfig, KVCache, rotation
from sinkgpt.pretrained import from_pretrained

TOL = 1e-10


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff if scale == 0 else diff / scale


# ------------------------------------------------------------------------------------------------
# the reference, written out from docs/sinks.md


def rope_table(positions, D, base=10000.0):
    """cos, sin (T, D/2) of the rotary angles position * base^(-2i/D), in float64."""
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angle.cos(), angle.sin()


def ref_rope(x, cos, sin):
    """Rotate channel pairs (i, i + R/2) of the first R = 2 cos.size(-1) channels of x (B, H, T, D) by the angles of
    each position (R = D unless rotary_pct < 1); the other channels pass unchanged."""
    R = 2 * cos.size(-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, rest = x[..., : R // 2], x[..., R // 2: R], x[..., R:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def ref_attention(attn, x, rope=None):
    """Eager attention of module `attn` (its parameters, read directly) on the normed block input x (B, T, C)."""
    B, T, C = x.shape
    H, Hkv = attn.n_head, attn.n_kv_head
    D = C // H
    group = H // Hkv  # grouped-query attention: query head h reads key/value head h // group
    qkv = x @ attn.c_attn.weight.T
    if attn.c_attn.bias is not None:
        qkv = qkv + attn.c_attn.bias
    q, k, v = qkv.split([C, Hkv * D, Hkv * D], dim=-1)
    q = q.reshape(B, T, H, D).transpose(1, 2)
    k, v = (t.reshape(B, T, Hkv, D).transpose(1, 2).repeat_interleave(group, dim=1) for t in (k, v))
    if hasattr(attn, "q_norm"):  # RMSNorm per head
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + attn.q_norm.eps) * attn.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + attn.k_norm.eps) * attn.k_norm.weight
    if rope is not None:
        q, k = ref_rope(q, *rope), ref_rope(k, *rope)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H, T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = j <= i
    if attn.window:  # a sliding window: the last `window` positions, and the sink-token prefix, always
        visible = visible & ((i - j < attn.window) | (j < attn.n_fixed))
    values = v
    if attn.sink in SLOT_SINKS:  # one extra column, seen by every query
        if attn.sink == "logit":
            column = attn.sink_logit.view(1, H, 1, 1).expand(B, H, T, 1)  # not scaled by 1/sqrt(d)
        elif attn.sink == "softmax1":
            column = scores.new_zeros(B, H, T, 1)
        else:  # kv_bias / k_bias: q . k' / sqrt(d), one slot key per key/value head
            k_slot = attn.k_slot.repeat_interleave(group, dim=0)
            column = (q * k_slot.view(1, H, 1, D)).sum(-1, keepdim=True) / math.sqrt(D)
        v_slot = attn.v_slot.repeat_interleave(group, dim=0) if attn.sink == "kv_bias" else torch.zeros(H, D, dtype=x.dtype)
        scores = torch.cat([column, scores], dim=-1)
        values = torch.cat([v_slot.view(1, H, 1, D).expand(B, H, 1, D), v], dim=2)
        visible = torch.cat([torch.ones(T, 1, dtype=torch.bool), visible], dim=1)
    if attn.attn_fn == "softmax":
        m = scores.masked_fill(~visible, -1e300).max(-1, keepdim=True).values.detach()
        e = torch.where(visible, torch.exp(scores - m), torch.zeros((), dtype=x.dtype))
        p = e / e.sum(-1, keepdim=True)
    elif attn.attn_fn == "sigmoid":  # no row normalisation
        p = torch.where(visible, 1.0 / (1.0 + torch.exp(-scores)), torch.zeros((), dtype=x.dtype))
    else:  # relu, divided by the number of keys each query sees (the slot counts as one)
        n_visible = visible.sum(-1, keepdim=True).to(x.dtype)
        p = torch.where(visible, scores.clamp(min=0), torch.zeros((), dtype=x.dtype)) / n_visible
    y = (p @ values).transpose(1, 2)  # (B, T, H, D)
    if attn.attn_gate != "none":
        g = x @ attn.c_gate.weight.T
        if attn.c_gate.bias is not None:
            g = g + attn.c_gate.bias
        y = y * (1.0 / (1.0 + torch.exp(-g))).view(B, T, H, -1)
    y = y.reshape(B, T, C) @ attn.c_proj.weight.T
    if attn.c_proj.bias is not None:
        y = y + attn.c_proj.bias
    return y


def ref_layer_norm(norm, x):
    if isinstance(norm, torch.nn.Module) and type(norm).__name__ == "RMSNorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight
    return out if norm.bias is None else out + norm.bias


def ref_block(block, x, rope=None):
    """Pre-norm GPT-2 block with the reference attention; the MLP is the model's own submodule. parallel_residual:
    x + attn(ln_1(x)) + mlp(ln_2(x))."""
    attn_out = ref_attention(block.attn, ref_layer_norm(block.ln_1, x), rope)
    if block.parallel:
        return x + attn_out + block.mlp(ref_layer_norm(block.ln_2, x))
    x = x + attn_out
    return x + block.mlp(ref_layer_norm(block.ln_2, x))


def ref_gpt_logits(model, idx):
    """The whole model written out: embeddings (+ positions), sink tokens prepended with no position, blocks
    one at a time (BOS residual overridden after each for sink='bos_override'), prefix dropped, head."""
    cfg = model.config
    B, T = idx.shape
    x = model.transformer.wte.weight[idx]
    if cfg.pos_emb == "learned":
        x = x + model.transformer.wpe.weight[:T]
    n = 0
    # rotary tables: the model's own (float32-rounded) angles, so that only the attention is under test
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if cfg.pos_emb == "rope" else None
    if cfg.sink == "token":
        n = cfg.n_sink_tokens
        x = torch.cat([model.sink_tokens.unsqueeze(0).expand(B, n, cfg.n_embd), x], dim=1)
        if rope is not None:  # the prefix takes no position: rotation by angle 0
            half = rope[0].size(1)
            rope = (torch.cat([rope[0].new_ones(n, half), rope[0]]), torch.cat([rope[1].new_zeros(n, half), rope[1]]))
    is_bos = (idx == cfg.bos_token)[..., None]
    for layer, block in enumerate(model.transformer.h):
        x = ref_block(block, x, rope)
        if cfg.sink == "bos_override":
            x = torch.where(is_bos, block.bos_resid.view(1, 1, -1).expand_as(x), x)
    x = ref_layer_norm(model.transformer.ln_f, x)[:, n:]
    return (x @ model.lm_head.weight.T)[..., : cfg.vocab_size]


# ------------------------------------------------------------------------------------------------
# random, non-trivial parameters


def randomize_attention(attn, gen):
    """Weights large enough that the attention is far from uniform; every sink parameter non-trivial."""
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name == "sink_logit":
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif name in ("k_slot", "v_slot"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif name.startswith(("q_norm", "k_norm")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_attention(H, seed=0, C_per_head=None, **options):
    C = 16 if C_per_head is None else C_per_head * H
    cfg = GPTConfig(n_layer=1, n_head=H, n_embd=C, block_size=32, vocab_size=10, **options)  # n_kv_head: GQA
    torch.manual_seed(seed)
    attn = CausalSelfAttention(cfg, 0).double()
    randomize_attention(attn, torch.Generator().manual_seed(seed + 1))
    return attn


def check_against_reference(attn, B, T, seed, path, rope=None):
    gen = torch.Generator().manual_seed(seed)
    C = attn.c_attn.weight.size(1)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    params = dict(attn.named_parameters())
    names = list(params)
    leaves = [x] + [params[n] for n in names]

    attn.hook_fns = {"scores": lambda s: None} if path == "eager" else {}  # a reading hook selects the eager path
    out = attn(x, rope=rotation(*rope) if rope is not None else None)  # the module takes apply_rope's tables
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    attn.hook_fns = {}
    ref = ref_attention(attn, x, rope)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), leaves)

    where = f"B={B} T={T} H={attn.n_head} path={path}"
    assert out.dtype == torch.float64
    assert rel_err(out, ref) <= TOL, f"output differs ({where}): {rel_err(out, ref):.3g}"
    for name, g, rg in zip(["x"] + names, grads, ref_grads):
        assert g is not None and rg is not None
        assert rel_err(g, rg) <= TOL, f"gradient of {name} differs ({where}): {rel_err(g, rg):.3g}"
    return out


# mechanisms: every slot sink with every gate; attn_fn sigmoid/relu with and without a slot sink
MECHANISMS = [dict(sink=s, attn_gate=g) for s in ("none",) + SLOT_SINKS for g in ("none", "headwise", "elementwise")]
MECHANISMS += [dict(sink=s, attn_fn=f) for f in ("sigmoid", "relu") for s in ("none", "kv_bias")]
MECHANISMS += [dict(sink="kv_bias", attn_gate="headwise", attn_fn="relu"), dict(sink="logit", qk_norm=True),
               dict(sink="kv_bias", qk_norm=True, bias=False), dict(sink="none", bias=False)]


def mech_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


CASES = [(m, path) for m in MECHANISMS for path in (("fast", "eager") if m.get("attn_fn", "softmax") == "softmax"
                                                      else ("eager",))]


@pytest.mark.parametrize("H,n_kv_head", [(1, 1), (2, 2), (4, 4), (4, 2), (4, 1)],
                         ids=["H1", "H2", "H4", "H4-kv2", "H4-kv1"])
@pytest.mark.parametrize("options,path", CASES, ids=[f"{mech_id(m)}-{p}" for m, p in CASES])
def test_attention_matches_reference(options, path, H, n_kv_head):
    attn = make_attention(H, seed=H + n_kv_head, n_kv_head=n_kv_head, **options)
    for B in (1, 3):
        for T in (1, 5, 17):
            check_against_reference(attn, B, T, seed=100 * B + T, path=path)


@pytest.mark.parametrize("n_kv_head", [2, 1])
@pytest.mark.parametrize("sink", ("none",) + SLOT_SINKS)
def test_attention_with_rope_matches_reference(sink, n_kv_head):
    """Rotary positions apply to queries and real keys only; the slot key is not rotated."""
    attn = make_attention(2, seed=3, C_per_head=8, sink=sink, n_kv_head=n_kv_head)
    for path in ("fast", "eager"):
        check_against_reference(attn, 3, 9, seed=5, path=path, rope=rope_table(torch.arange(9), 8))


def test_rope_tables_match_the_formula():
    """The model keeps its rotary tables in float32: equal to the float64 formula to float32 rounding."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=10, pos_emb="rope"))
    cos, sin = rope_table(torch.arange(64), 8)
    torch.testing.assert_close(model.rope_cos.double(), cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.rope_sin.double(), sin, rtol=0, atol=1e-7)


def test_apply_rope_is_the_written_out_rotation_bit_for_bit():
    """x cos + roll(x) sin with rotation()'s tables does the same float operations as (x1 cos - x2 sin,
    x1 sin + x2 cos), so pretrained logits do not move by a rounding when the formula is rearranged."""
    from model import apply_rope, rope_tables
    cos, sin = rope_tables(16, 40, 10000.0)
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    x1, x2 = x[..., :8], x[..., 8:]
    assert torch.equal(apply_rope(x, *rotation(cos, sin)), torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1))


def test_fast_path_really_is_the_fused_one():
    """Without hooks, softmax attention must not go through attend_eager (the fast path is what is tested)."""
    attn = make_attention(2, sink="logit")
    calls = []
    original = attn.attend_eager
    attn.attend_eager = lambda *a: calls.append(1) or original(*a)
    attn(torch.randn(1, 4, 16, dtype=torch.float64))
    assert calls == []
    attn.hook_fns = {"pattern": lambda p: None}
    attn(torch.randn(1, 4, 16, dtype=torch.float64))
    assert calls == [1]


# ------------------------------------------------------------------------------------------------
# GPT level: sink tokens, BOS override (and every mechanism through the whole model)


def make_gpt(seed=0, **options):
    kwargs = dict(n_layer=2, n_head=2, n_embd=16, block_size=24, vocab_size=11, bos_token=10)
    kwargs.update(options)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**kwargs)).double()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for block in model.transformer.h:
            randomize_attention(block.attn, gen)
        if hasattr(model, "sink_tokens"):
            model.sink_tokens.copy_(torch.randn(model.sink_tokens.shape, generator=gen, dtype=torch.float64))
        for block in model.transformer.h:
            if hasattr(block, "bos_resid"):
                block.bos_resid.copy_(torch.randn(block.bos_resid.shape, generator=gen, dtype=torch.float64))
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen,
                                                                                       dtype=torch.float64))
    return model


def sample_idx(model, B, T, seed, bos_positions=()):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size - 1, (B, T), generator=gen)  # no BOS unless placed
    for b, t in bos_positions:
        idx[b, t] = model.config.bos_token
    return idx


def check_gpt_against_reference(model, idx, extra_param):
    upstream = torch.randn(*idx.shape, model.config.vocab_size, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    leaves = [extra_param, model.transformer.wte.weight, model.transformer.h[0].attn.c_attn.weight]
    logits, _ = model(idx)
    grads = torch.autograd.grad((logits * upstream).sum(), leaves)
    ref = ref_gpt_logits(model, idx)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), leaves)
    assert logits.shape == ref.shape == (*idx.shape, model.config.vocab_size)
    assert rel_err(logits, ref) <= TOL, rel_err(logits, ref)
    for name, g, rg in zip(("mechanism parameter", "wte", "h.0.c_attn"), grads, ref_grads):
        assert g.abs().max() > 0, f"no gradient reaches the {name}"
        assert rel_err(g, rg) <= TOL, f"{name}: {rel_err(g, rg):.3g}"


@pytest.mark.parametrize("n_sink_tokens", [1, 3])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_sink_tokens_match_reference(n_sink_tokens, pos_emb):
    model = make_gpt(sink="token", n_sink_tokens=n_sink_tokens, pos_emb=pos_emb)
    for B, T in ((1, 1), (3, 7), (2, 24)):
        check_gpt_against_reference(model, sample_idx(model, B, T, seed=T), model.sink_tokens)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_bos_override_matches_reference(pos_emb):
    model = make_gpt(sink="bos_override", pos_emb=pos_emb)
    idx = sample_idx(model, 3, 12, seed=2, bos_positions=[(0, 0), (0, 5), (1, 11), (2, 3), (2, 4)])
    bos_resid = [block.bos_resid for block in model.transformer.h]
    check_gpt_against_reference(model, idx, bos_resid[0])
    check_gpt_against_reference(model, idx, bos_resid[1])
    # the override is really applied: the last block's residual at a BOS is exactly the learned vector
    captured = {"x": model.run_with_cache(idx, ["h.1.resid_post"])[2]["h.1.resid_post"]}
    torch.testing.assert_close(captured["x"][0, 5], bos_resid[1].detach(), rtol=0, atol=0)
    assert not torch.equal(captured["x"][0, 4], bos_resid[1].detach())
    # a sequence without BOS never sees the parameter
    logits, _ = model(sample_idx(model, 2, 6, seed=3))
    grad = torch.autograd.grad(logits.sum(), bos_resid[0], allow_unused=True)[0]
    assert grad is None or (grad == 0).all()


GPT_MECHANISMS = [dict(sink=s) for s in ("none", "token", "logit", "softmax1", "kv_bias", "k_bias", "bos_override")]
GPT_MECHANISMS += [dict(sink="token", n_sink_tokens=2, pos_emb="rope"), dict(attn_gate="headwise", sink="logit"),
                   dict(attn_gate="elementwise", sink="kv_bias"), dict(attn_fn="sigmoid"),
                   dict(attn_fn="relu", sink="kv_bias"), dict(attn_fn="sigmoid", sink="token"),
                   dict(pos_emb="rope", sink="softmax1", qk_norm=True), dict(pos_emb="rope", sink="bos_override"),
                   dict(sink="token", attn_gate="elementwise"), dict(sink="bos_override", attn_gate="headwise"),
                   dict(sink="k_bias", attn_gate="headwise", norm="rmsnorm", bias=False)]
# grouped-query attention (4 query heads, 2 or 1 key/value heads) with every option, the Llama shape among them
GPT_MECHANISMS += [dict(n_head=4, n_kv_head=2, sink=s) for s in ("none", "token", "logit", "softmax1", "kv_bias",
                                                                 "k_bias", "bos_override")]
GPT_MECHANISMS += [dict(n_head=4, n_kv_head=1, sink="kv_bias", attn_gate="headwise"),
                   dict(n_head=4, n_kv_head=2, attn_fn="relu", sink="kv_bias"),
                   dict(n_head=4, n_kv_head=2, attn_fn="sigmoid", attn_gate="elementwise"),
                   dict(n_head=4, n_kv_head=2, sink="logit", qk_norm=True, pos_emb="rope"),
                   dict(n_head=4, n_kv_head=2, pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", bias=False,
                        tie_embeddings=False, norm_eps=1e-6, mlp_hidden=24, sink="softmax1")]
# GPT-NeoX's block (parallel residual, rotary on half of each head) and Qwen2's q/k/v biases, with sinks
GPT_MECHANISMS += [dict(pos_emb="rope", rotary_pct=0.5, parallel_residual=True, sink=s)
                   for s in ("none", "token", "logit", "kv_bias", "bos_override")]
GPT_MECHANISMS += [dict(pos_emb="rope", rotary_pct=0.5, parallel_residual=True, attn_gate="headwise", qk_norm=True),
                   dict(n_head=4, n_kv_head=2, pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", bias=False,
                        qkv_bias=True, sink="k_bias")]


@pytest.mark.parametrize("options", GPT_MECHANISMS, ids=[mech_id(m) for m in GPT_MECHANISMS])
def test_whole_model_matches_reference(options):
    model = make_gpt(**options)
    idx = sample_idx(model, 2, 10, seed=4, bos_positions=[(0, 0), (1, 6)])
    check_gpt_against_reference(model, idx, model.transformer.h[1].attn.c_proj.weight)


# ------------------------------------------------------------------------------------------------
# the KV cache (incremental decoding) equals the full forward


@pytest.mark.parametrize("eager", [False, True], ids=["fast", "eager"])
@pytest.mark.parametrize("options", GPT_MECHANISMS, ids=[mech_id(m) for m in GPT_MECHANISMS])
def test_kv_cache_equals_full_forward(options, eager):
    model = make_gpt(**options).eval()
    # reading hooks on the scores switch every layer to the eager path
    reads = {f"h.{layer}.scores": (lambda s: None) for layer in range(model.config.n_layer)} if eager else {}
    idx = sample_idx(model, 2, 14, seed=9, bos_positions=[(0, 0), (1, 0), (0, 6), (1, 9), (0, 12)])
    with model.hooks(reads):
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer)
        pieces, start = [], 0
        for size in (5, 3, 1, 1, 2, 1, 1):  # a prefill, a chunk, then single tokens
            logits, _ = model(idx[:, start:start + size], cache=cache)
            assert logits.shape == (2, size, model.config.vocab_size)
            pieces.append(logits)
            start += size
    assert start == idx.size(1) and cache.pos == idx.size(1)
    incremental = torch.cat(pieces, dim=1)
    assert rel_err(incremental, full) <= TOL, rel_err(incremental, full)


def test_kv_cache_refuses_to_run_past_block_size():
    model = make_gpt(block_size=8).eval()
    cache = KVCache(model.config.n_layer)
    model(sample_idx(model, 1, 8, seed=0), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(sample_idx(model, 1, 1, seed=1), cache=cache)


# ------------------------------------------------------------------------------------------------
# each option really acts


def identity_projection(attn):
    """c_proj = identity, no bias: the module's output is the (gated) attention output itself."""
    with torch.no_grad():
        attn.c_proj.weight.copy_(torch.eye(attn.c_proj.weight.size(0), dtype=attn.c_proj.weight.dtype))
        if attn.c_proj.bias is not None:
            attn.c_proj.bias.zero_()


def x_input(C, B=2, T=9, seed=0):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def plain_twin(attn, **options):
    """A sink='none' module with the same q/k/v and projection weights."""
    H = attn.n_head
    twin = make_attention(H, **options)
    twin.load_state_dict({k: v for k, v in attn.state_dict().items() if k.startswith(("c_attn", "c_proj"))},
                         strict=False)
    return twin


@pytest.mark.parametrize("path", ["fast", "eager"])
def test_large_sink_logit_switches_attention_off_and_very_negative_gives_plain_attention(path):
    attn = make_attention(4, sink="logit")
    identity_projection(attn)
    plain = plain_twin(attn)
    x = x_input(16)
    hooks = {"scores": lambda s: None} if path == "eager" else {}
    attn.hook_fns, plain.hook_fns = hooks, hooks
    reference = plain(x)
    with torch.no_grad():
        attn.sink_logit.fill_(30.0)
        off = attn(x)
        attn.sink_logit.fill_(-30.0)
        on = attn(x)
    assert off.norm() / reference.norm() < 1e-6
    assert rel_err(on, reference) <= TOL
    assert reference.norm() > 0.1


@pytest.mark.parametrize("path", ["fast", "eager"])
def test_kv_bias_with_an_aligned_huge_key_returns_the_slot_value(path):
    attn = make_attention(2, sink="kv_bias")
    identity_projection(attn)
    C, H, D = 16, 2, 8
    with torch.no_grad():  # every query is the q bias b_q (q weights zero); k' = 50 b_q / |b_q|^2 * sqrt(D)
        attn.c_attn.weight[:C].zero_()
        b_q = attn.c_attn.bias[:C].view(H, D)
        attn.k_slot.copy_(60.0 * math.sqrt(D) * b_q / b_q.pow(2).sum(-1, keepdim=True))  # q.k'/sqrt(d) = 60
    attn.hook_fns = {"scores": lambda s: None} if path == "eager" else {}
    y = attn(x_input(C))
    expected = attn.v_slot.detach().reshape(1, 1, C).expand_as(y)
    assert rel_err(y, expected) < 1e-12
    # k_bias: the same alignment gives an output of ~0 (its slot value is 0)
    kb = make_attention(2, sink="k_bias")
    kb.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "v_slot"})
    kb.hook_fns = attn.hook_fns
    assert kb(x_input(C)).abs().max() < 1e-12


@pytest.mark.parametrize("sink", ["none", "logit", "kv_bias"])
@pytest.mark.parametrize("path", ["fast", "eager"])
def test_headwise_gate_closed_and_open(sink, path):
    attn = make_attention(4, sink=sink, attn_gate="headwise")
    identity_projection(attn)
    ungated = make_attention(4, sink=sink)
    ungated.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("c_gate")})
    hooks = {"scores": lambda s: None} if path == "eager" else {}
    attn.hook_fns, ungated.hook_fns = hooks, hooks
    x = x_input(16)
    reference = ungated(x)
    with torch.no_grad():
        attn.c_gate.weight.zero_()
        attn.c_gate.bias.fill_(-30.0)
        closed = attn(x)
        attn.c_gate.bias.fill_(30.0)
        open_ = attn(x)
        attn.c_gate.bias[1] = -30.0  # close one head only: exactly that head's channels vanish
        one_closed = attn(x)
    assert closed.norm() / reference.norm() < 1e-6
    assert rel_err(open_, reference) <= TOL
    assert one_closed[..., 4:8].abs().max() / reference[..., 4:8].abs().max() < 1e-6
    assert rel_err(one_closed[..., 8:], reference[..., 8:]) <= TOL


def test_elementwise_gate_scales_each_channel():
    attn = make_attention(2, attn_gate="elementwise")
    identity_projection(attn)
    ungated = make_attention(2)
    ungated.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("c_gate")})
    x = x_input(16)
    with torch.no_grad():
        attn.c_gate.weight.zero_()
        attn.c_gate.bias.copy_(torch.linspace(-3, 3, 16, dtype=torch.float64))
        gated = attn(x)
    expected = ungated(x) * torch.sigmoid(torch.linspace(-3, 3, 16, dtype=torch.float64))
    assert rel_err(gated, expected) <= TOL


def capture_pattern(attn, x):
    captured = {}
    attn.hook_fns = {"pattern": lambda p: captured.setdefault("p", p)}
    attn(x)
    attn.hook_fns = {}
    return captured["p"]


def test_softmax1_rows_sum_to_less_than_one():
    attn = make_attention(2, sink="softmax1")
    x = x_input(16)
    p = capture_pattern(attn, x)  # (B, H, T, 1 + T): column 0 is the slot
    assert p.shape == (2, 2, 9, 10)
    real = p[..., 1:].sum(-1)
    assert (real < 1).all() and (real > 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones_like(real), rtol=0, atol=1e-12)
    # the slot's weight is exactly 1 / (1 + sum_j e^{a_ij})
    H, D = 2, 8
    qkv = x @ attn.c_attn.weight.T + attn.c_attn.bias
    q, k = (t.reshape(2, 9, H, D).transpose(1, 2) for t in qkv.split(16, -1)[:2])
    a = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(p[..., 0], 1 / (1 + a.exp().sum(-1)), rtol=1e-12, atol=0)


def test_plain_softmax_rows_sum_to_one_and_sigmoid_rows_do_not():
    x = x_input(16)
    p = capture_pattern(make_attention(2), x)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 9, dtype=torch.float64), rtol=0, atol=1e-12)
    p = capture_pattern(make_attention(2, attn_fn="sigmoid"), x)
    assert (p.triu(1) == 0).all()  # causal
    assert (p.sum(-1)[..., 1:] > 1).any()  # not normalised
    p = capture_pattern(make_attention(2, attn_fn="relu"), x)
    assert (p >= 0).all() and (p == 0).any()


# ------------------------------------------------------------------------------------------------
# continuing a pretrained GPT-2 with a sink option: how close does step 0 start?

STEP0_OPTIONS = [dict(sink="logit"), dict(attn_gate="headwise"), dict(attn_gate="elementwise"),
                 dict(sink="bos_override"), dict(sink="softmax1"), dict(sink="kv_bias"), dict(sink="k_bias"),
                 dict(sink="token"), dict(sink="logit", attn_gate="headwise")]
TIGHT = {"attn_gate=headwise": 1e-6, "attn_gate=elementwise": 1e-6}  # the gate starts exact (1/2, c_proj x 2)


def step0_sequence():
    idx = torch.randint(0, HF_VOCAB - 1, (2, 24), generator=torch.Generator().manual_seed(0))
    idx[:, 0] = HF_BOS  # starts with BOS, the only one
    return idx


@pytest.fixture(scope="module")
def plain_pretrained_logits(hf_dir):
    model = from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return model(step0_sequence())[0]


@pytest.mark.parametrize("options", STEP0_OPTIONS, ids=[mech_id(m) for m in STEP0_OPTIONS])
def test_pretrained_step0_deviation(options, hf_dir, plain_pretrained_logits, record_property):
    model = from_pretrained(hf_dir, **options).eval()
    assert model.config.bos_token == HF_BOS
    with torch.no_grad():
        logits = model(step0_sequence())[0]
    assert torch.isfinite(logits).all()
    abs_dev = (logits - plain_pretrained_logits).abs().max().item()
    rel_dev = abs_dev / plain_pretrained_logits.abs().max().item()
    key = mech_id(options)
    record_property("step0_max_abs_dev", abs_dev)
    record_property("step0_rel_dev", rel_dev)
    print(f"\nstep-0 deviation from plain GPT-2, {key}: max abs {abs_dev:.3e}, relative {rel_dev:.3e}")
    if key in TIGHT:
        assert rel_dev < TIGHT[key]
    if key == "sink=bos_override":
        assert abs_dev <= 1e-5
    # the mechanism is there (not silently dropped)
    names = dict(model.named_parameters())
    expected = {"sink=logit": "sink_logit", "sink=kv_bias": "v_slot", "sink=k_bias": "k_slot",
                "sink=token": "sink_tokens", "sink=bos_override": "bos_resid",
                "attn_gate=headwise": "c_gate", "attn_gate=elementwise": "c_gate"}
    if key in expected:
        assert any(expected[key] in n for n in names)


def test_pretrained_sink_logit_and_gate_start_where_their_gradients_are_largest(hf_dir):
    """The logit starts at 0 (softmax1, as the zero key/value slots), the gate at sigmoid(0) = 1/2 (slope 1/4, not
    sigmoid'(10) = 4.5e-5) with c_proj doubled, so the gated model computes the pretrained output."""
    plain = from_pretrained(hf_dir)
    model = from_pretrained(hf_dir, sink="logit", attn_gate="headwise")
    for block, plain_block in zip(model.transformer.h, plain.transformer.h):
        assert torch.equal(block.attn.sink_logit, torch.zeros(4))
        assert torch.equal(block.attn.c_gate.weight, torch.zeros(4, 64))
        assert torch.equal(block.attn.c_gate.bias, torch.zeros(4))
        assert torch.equal(block.attn.c_proj.weight, 2 * plain_block.attn.c_proj.weight)
        assert torch.equal(block.attn.c_proj.bias, plain_block.attn.c_proj.bias)


def test_pretrained_sink_token_with_tokens_from_position_1_is_the_bos_first_model(hf_dir):
    """sink='token' starts as BOS's embedding at position 0; with pos_offset=1 the real tokens keep their
    positions, so the model without BOS computes what the pretrained model computes with BOS first."""
    plain = from_pretrained(hf_dir).eval()
    model = from_pretrained(hf_dir, sink="token", pos_offset=1).eval()
    assert model.config.block_size == plain.config.block_size - 1
    idx = step0_sequence()
    with torch.no_grad():
        torch.testing.assert_close(model(idx[:, 1:])[0], plain(idx)[0][:, 1:], rtol=0, atol=1e-5)


def test_pretrained_bos_override_holds_the_models_own_bos_residual(hf_dir):
    plain = from_pretrained(hf_dir).eval()
    with torch.no_grad():
        cache = plain.run_with_cache(torch.tensor([[HF_BOS, 3, 4]]), ["h.0.resid_post", "h.1.resid_post"])[2]
    captured = {layer: cache[f"h.{layer}.resid_post"][0, 0] for layer in range(2)}
    model = from_pretrained(hf_dir, sink="bos_override")
    for layer, block in enumerate(model.transformer.h):
        torch.testing.assert_close(block.bos_resid.detach(), captured[layer], rtol=1e-5, atol=1e-5)
    assert model.config.sink == "bos_override" and not any(b.hook_fns for b in model.transformer.h)


@pytest.mark.parametrize("attn_fn", ["sigmoid", "relu"])
@pytest.mark.parametrize("sink", ["logit", "softmax1", "k_bias"])
def test_slot_with_zero_value_is_refused_without_softmax(sink, attn_fn):
    # unnormalised rows ignore a zero-value slot: the combination would train a parameter that does nothing
    with pytest.raises(ValueError, match=f"sink='{sink}' does nothing with attn_fn='{attn_fn}'"):
        GPTConfig(sink=sink, attn_fn=attn_fn)


# ------------------------------------------------------------------------------------------------
# grouped-query attention: the fused kernel and the cache see only the shared key/value heads


@pytest.mark.parametrize("sink", ("none",) + SLOT_SINKS)
def test_gqa_fast_path_gives_the_kernel_and_the_cache_the_shared_heads_only(sink, monkeypatch):
    model = make_gpt(n_head=4, n_kv_head=2, sink=sink).eval()
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.size(1), k.size(1), v.size(1), kwargs.get("enable_gqa")))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    idx = sample_idx(model, 2, 6, seed=1)
    cache = KVCache(model.config.n_layer)
    with torch.no_grad():
        model(idx[:, :5], cache=cache)
        model(idx[:, 5:], cache=cache)
    assert seen and all(entry == (4, 2, 2, True) for entry in seen), seen
    keys, values = cache.buffers[0]
    assert keys.size(1) == values.size(1) == 2 and cache.length[0] == 6


def test_a_gate_checkpoint_saved_without_a_gate_bias_loads_as_the_same_gate():
    """Gates of bias-free models had no bias before the gate always carried one: such a checkpoint loads with a
    zero bias, which is the same function."""
    from sinkgpt.checkpoint import model_from_checkpoint
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, bias=False, attn_gate="headwise")
    model = GPT(config).eval()
    old_state = {k: v for k, v in model.state_dict().items() if not k.endswith("c_gate.bias")}
    assert len(old_state) < len(model.state_dict())
    loaded = model_from_checkpoint({"model_args": config.to_dict(), "model": old_state}).eval()
    idx = torch.randint(0, 32, (2, 8))
    assert all(torch.equal(b.attn.c_gate.bias, torch.zeros(2)) for b in loaded.transformer.h)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0])  # model's own gate bias starts at zero too


RETROFITS = {"sink=logit": ["sink_logit"], "sink=kv_bias": ["k_slot", "v_slot"], "sink=k_bias": ["k_slot"],
             "sink=token": ["sink_tokens"], "sink=bos_override": ["bos_resid"],
             "attn_gate=headwise": ["c_gate.weight", "c_gate.bias"], "attn_gate=elementwise": ["c_gate.weight", "c_gate.bias"]}


@pytest.mark.parametrize("option", RETROFITS)
def test_each_retrofit_starts_with_a_live_gradient_and_moves_in_a_few_steps(option, hf_dir):
    """A retrofit's start is not saturated: at step 0 every new parameter's mean |gradient| is at least 5% of
    its layer's c_attn weight's (measured 0.15-4.7; the old starts, a gate at sigmoid(10) and a logit at -10,
    gave 1.8e-4 and 4.7e-5), and five steps of the training optimizer (sink group) move each of them."""
    from sinkgpt.config import load_config
    from sinkgpt.optim import build_optimizer
    key, value = option.split("=")
    model = from_pretrained(hf_dir, **{key: value}).train()
    params = {n: p for n, p in model.named_parameters() if any(n.endswith(s) for s in RETROFITS[option])}
    assert params
    start = {n: p.detach().clone() for n, p in params.items()}
    cfg = load_config(["--learning_rate=1e-3", "--weight_decay=0.0"])
    optimizer = build_optimizer(model, cfg, "cpu")
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        idx = torch.randint(0, HF_VOCAB - 1, (8, 17), generator=gen)
        idx[:, 0] = HF_BOS
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if step == 0:
            for name, p in params.items():
                layer = name.split(".")[2] if name.startswith("transformer.h.") else "0"
                reference = model.transformer.h[int(layer)].attn.c_attn.weight.grad.abs().mean()
                assert p.grad.abs().mean() >= 0.05 * reference, name
        optimizer.step()
        optimizer.zero_grad()
    for name, p in params.items():
        assert (p.detach() - start[name]).abs().max().item() > 1e-3, name
