"""
The sinkgpt model: GPT-2 in one file, with options for dedicated attention-sink parameters.

Read it top to bottom: the config, small helpers (norms, rotary positions, masks, the hook points and their
tensor shapes, the KV cache), attention (where every sink mechanism is one marked piece), the MLP, the block,
and the GPT itself with its scoped analysis hooks, generation, and the neutral start of sink options added to a
pretrained model. Every option defaults to plain GPT-2. The mechanisms and metrics are defined in docs/sinks.md
(the project's reference sheet); reading and writing Hugging Face folders is sinkgpt/pretrained.py.

Imports nothing of ours (torch only).
"""

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

# sink mechanisms that add one extra column ("slot") to every attention row
SLOT_SINKS = ("logit", "softmax1", "kv_bias", "k_bias")
CHOICES = {
    "sink": ("none", "token", "logit", "softmax1", "kv_bias", "k_bias", "bos_override"),
    "attn_gate": ("none", "headwise", "elementwise"),
    "attn_fn": ("softmax", "sigmoid", "relu"),
    "pos_emb": ("learned", "rope", "none"),
    "norm": ("layernorm", "rmsnorm"),
    "norm_pos": ("pre", "post"),
    "mlp_act": ("gelu", "gelu_exact", "relu", "relu2", "swiglu"),
}


@dataclass
class GPTConfig:
    # GPT-2 small
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int = 0  # key/value heads, shared by groups of query heads (grouped-query attention); 0 = n_head
    dropout: float = 0.0
    bias: bool = True  # biases in linears and norms, as in GPT-2
    qkv_bias: bool = False  # biases on the query/key/value projection even without `bias` (Qwen2)
    pad_vocab: bool = False  # pad the embedding rows to a multiple of 64 (faster matmuls); logits keep vocab_size
    # dedicated attention-sink options (docs/sinks.md)
    sink: str = "none"
    n_sink_tokens: int = 1  # sink == "token": how many learned prefix vectors (>1 = registers)
    attn_gate: str = "none"  # sigmoid output gate after attention (Qiu et al. 2025, G1)
    attn_fn: str = "softmax"  # sigmoid: no row normalisation (Gu et al.); relu: ReLU(scores)/n_visible (Guo et al.)
    bos_token: int = 50256  # the token that marks document starts (sink == "bos_override")
    pos_offset: int = 0  # the position of the first real token: 1 once a BOS at position 0 became a slot (bos_as_slot)
    # sliding-window attention: each query sees the last attn_window positions, itself included (0 = full
    # attention); a list is a per-layer pattern, cycled over the layers ([128, 0]: gpt-oss's alternation)
    attn_window: int = 0
    # architecture ablations (defaults = GPT-2)
    pos_emb: str = "learned"
    rope_base: float = 10000.0
    rotary_pct: float = 1.0  # rotary on the first int(rotary_pct * head_size) channels of each head (GPT-NeoX)
    norm: str = "layernorm"
    norm_pos: str = "pre"
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)), attention and MLP side by side (GPT-NeoX)
    norm_eps: float = 1e-5
    qk_norm: bool = False
    mlp_act: str = "gelu"  # GPT-2's tanh approximation; gelu_exact = the erf GELU (nanoGPT's nn.GELU())
    mlp_hidden: int = 0  # the MLP's hidden width; 0 = 4 * n_embd (swiglu: 8/3 * n_embd rounded up to 64)
    tie_embeddings: bool = True
    logit_softcap: float = 0.0  # 0 = off; else logits = c * tanh(logits / c)

    def __post_init__(self):
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (0 = n_head)")
        if self.mlp_hidden < 0 or self.norm_eps <= 0:
            raise ValueError(f"mlp_hidden must be >= 0 (0 = the default width) and norm_eps > 0, got "
                             f"{self.mlp_hidden} and {self.norm_eps}")
        if not 0 < self.rotary_pct <= 1 or (self.rotary_pct != 1 and self.pos_emb != "rope"):
            raise ValueError(f"rotary_pct={self.rotary_pct} must be in (0, 1] and needs pos_emb='rope' below 1")
        if self.pos_emb == "rope" and (self.rotary_dims % 2 or not self.rotary_dims):
            raise ValueError(f"pos_emb='rope' needs an even, non-zero number of rotary channels per head "
                             f"(int(rotary_pct * head_size) = {self.rotary_dims})")
        if self.parallel_residual and self.norm_pos == "post":
            raise ValueError("parallel_residual=True is a pre-norm block (norm_pos='pre')")
        if self.attn_fn != "softmax" and self.sink in ("logit", "softmax1", "k_bias"):
            raise ValueError(f"sink={self.sink!r} does nothing with attn_fn={self.attn_fn!r}: its slot has value 0 "
                             "and the rows are not normalised (use kv_bias, token or bos_override)")
        if self.n_sink_tokens < 1 or self.pos_offset < 0:
            raise ValueError(f"n_sink_tokens must be >= 1 and pos_offset >= 0, got {self.n_sink_tokens} and "
                             f"{self.pos_offset}")
        windows = self.window_pattern
        if not windows or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in windows):
            raise ValueError(f"attn_window must be an int >= 0 (0 = full attention) or a non-empty list of them, "
                             f"got {self.attn_window!r}")
        if max(windows) > self.block_size:
            raise ValueError(f"attn_window={max(windows)} is larger than the context (block_size={self.block_size}); "
                             "0 means full attention")
        if self.rope_base <= 0 or self.logit_softcap < 0:
            raise ValueError(f"rope_base must be > 0 and logit_softcap >= 0 (0 = off), got {self.rope_base} and "
                             f"{self.logit_softcap}")

    @property
    def padded_vocab_size(self):
        return (self.vocab_size + 63) // 64 * 64 if self.pad_vocab else self.vocab_size

    @property
    def n_positions(self):
        """Rows of the position tables: block_size real tokens from position pos_offset on."""
        return self.block_size + self.pos_offset

    @property
    def window_pattern(self):
        """attn_window as a list, cycled over the layers (one int: the same window on every layer)."""
        w = self.attn_window
        return list(w) if isinstance(w, (list, tuple)) else [w]

    def window_of(self, layer):
        """The attention window of one layer (0 = full attention)."""
        pattern = self.window_pattern
        return pattern[layer % len(pattern)]

    def layer_windows(self):
        """Every layer's attention window, in layer order."""
        return [self.window_of(layer) for layer in range(self.n_layer)]

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def rotary_dims(self):
        """Channels of each query/key head that rotary turns (all of them unless rotary_pct < 1), as GPT-NeoX
        counts them."""
        return int(self.head_size * self.rotary_pct)

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self):
        """The MLP's hidden width (the gate and the up projection each have it with swiglu)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp_act == "swiglu":  # 2/3 of the width keeps the parameter count of a 4C MLP
            return (8 * self.n_embd // 3 + 63) // 64 * 64
        return 4 * self.n_embd

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """A config from saved model_args; a key this model does not implement is a ValueError naming it (keys
        added since the checkpoint was written take their defaults, which reproduce the old behaviour)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"model setting {unknown[0]!r}={d[unknown[0]]!r} is not implemented by this model")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------
# small helpers


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1). GPT-2's eps is 1e-5."""

    def __init__(self, ndim, bias, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, ndim, bias=False, eps=1e-5):  # bias is ignored: RMSNorm has none
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(config, ndim=None):
    norm_class = LayerNorm if config.norm == "layernorm" else RMSNorm
    return norm_class(ndim or config.n_embd, config.bias, config.norm_eps)


def rope_tables(dims, n_positions, base):
    """cos and sin of the rotary angles of `dims` channels (the head size, or rotary_dims), (n_positions, dims/2)
    each: computed in float64, kept in float32 (they follow the model's dtype, so decoding casts nothing per step)."""
    inv_freq = 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def rotation(cos, sin):
    """The tables apply_rope takes, (T, D) each, from rope_tables' (T, D/2): [cos, cos] and [-sin, sin]. Built
    once per forward pass, so that every layer rotates its queries and keys in four ops."""
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + R/2) of x (B, H, T, D) by the angles of each position, given the tables of
    rotation(), (T, R): (x1 cos - x2 sin, x2 cos + x1 sin), the same float operations as written out. Tables
    narrower than the head (rotary_pct < 1) turn its first R channels and pass the rest, as GPT-NeoX does."""
    R = cos.size(-1)
    if R < x.size(-1):
        return torch.cat([apply_rope(x[..., :R], cos, sin), x[..., R:]], dim=-1)
    return x * cos.to(x.dtype) + x.roll(R // 2, dims=-1) * sin.to(x.dtype)


def causal_mask(n_queries, n_keys, device, window=0, n_fixed=0):
    """Boolean (n_queries, n_keys) mask, True = visible. Queries are the last n_queries positions of the keys
    (a 'lower-right' causal mask), so cached earlier keys and prepended slots stay visible. With a window, a query
    sees only the keys less than `window` positions back, except the first n_fixed keys (a slot or sink tokens),
    which every query sees and which do not count against the window (StreamingLLM's rule)."""
    offset = n_keys - n_queries
    q_pos = torch.arange(n_queries, device=device)[:, None] + offset
    k_pos = torch.arange(n_keys, device=device)[None, :]
    visible = k_pos <= q_pos
    if window:
        visible = visible & ((q_pos - k_pos < window) | (k_pos < n_fixed))
    return visible


FLEX_HEAD_SIZES = (16, 32, 64, 128, 256)  # FlexAttention's kernels want a power-of-two head size


def flex_window_attention(q, k, v, window, n_fixed, scale):
    """Sliding-window attention with FlexAttention's block mask: blocks outside the band are skipped, so the
    cost grows with the window, not the context (used on CUDA inside torch.compile, where it is fused)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    offset = k.size(2) - q.size(2)

    def visible(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        return (kv_idx <= q_pos) & ((q_pos - kv_idx < window) | (kv_idx < n_fixed))

    block_mask = create_block_mask(visible, None, None, q.size(2), k.size(2), device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.size(1) != q.size(1))


def gqa_in_kernel(q, mask):
    """Whether the fused kernel reads grouped key/value heads itself (enable_gqa). On CUDA only flash and cuDNN
    do, for float16/bfloat16 without a mask; float32 or masked calls with enable_gqa fall back to the math
    kernel, which materialises the scores (pytorch#159469), so there the heads are repeated instead and the
    memory-efficient kernel runs. CPU kernels keep enable_gqa."""
    return not q.is_cuda or (mask is None and q.dtype in (torch.float16, torch.bfloat16))


# Analysis hook points and the shape of the tensor each one sees. B batch; P residual positions of this forward
# pass (the T real tokens, after the n_sink_tokens prefix when sink='token'; with a KV cache only the new ones);
# C n_embd; H query heads; Hkv key/value heads (n_kv_head); D head size; K keys each query can see (cached
# positions first; slot sinks add one column, column 0); M the MLP's hidden width. Registered with `with model.hooks({"h.3.resid_post": fn}): ...`.
GLOBAL_HOOK_POINTS = {
    "embed": "(B, T, C)  token (+ learned position) embeddings, before the sink-token prefix",
    "ln_f": "(B, P, C)  the final norm's output",
}
HOOK_POINTS = {  # per block: "h.<layer>.<point>"
    "resid_pre": "(B, P, C)  the block's input",
    "ln_1": "(B, P, C)  attention's normed input (norm_pos='post': the norm after the first residual add)",
    "q": "(B, H, P, D)  queries, after qk_norm and rotary",
    "k": "(B, Hkv, P, D)  keys of this pass's positions, after qk_norm and rotary (before cache and slot)",
    "v": "(B, Hkv, P, D)  values of this pass's positions",
    "scores": "(B, H, P, K)  q.k / sqrt(D), -inf where not visible; slot sinks: column 0 is the slot",
    "pattern": "(B, H, P, K)  softmax(scores); sigmoid(scores) for attn_fn=sigmoid; relu(scores) / visible "
               "keys (the slot counted) for attn_fn=relu",
    "z": "(B, P, H, D)  each head's output (pattern @ values, after the gate)",
    "attn_z": "(B, P, C)  the heads' outputs (pattern @ values, after the gate), concatenated: c_proj's input",
    "head_out": "(B, P, H, C)  each head's share of attention's output: its D columns of c_proj applied to its "
                "output; computed only when hooked (attn_out = the sum over heads + c_proj's bias, no head's)",
    "attn_out": "(B, P, C)  attention's output, after c_proj",
    "resid_mid": "(B, P, C)  after the attention residual add (parallel_residual: x + attn_out, which the MLP does "
                 "not read)",
    "ln_2": "(B, P, C)  the MLP's normed input (norm_pos='post': the norm after the second residual add; "
            "parallel_residual: the norm of the block's input)",
    "mlp_pre": "(B, P, M)  c_fc's output (swiglu: (B, P, 2M), gate half then up half)",
    "mlp_post": "(B, P, M)  after the activation (swiglu: silu(gate) * up)",
    "mlp_out": "(B, P, C)  the MLP's output, after c_proj",
    "resid_post": "(B, P, C)  the block's output (after the BOS override when sink='bos_override')",
}


def hook(hooks, name, x):
    """An analysis hook point: returns x unchanged unless a function was registered for `name`.
    The function may read x and return None, or return a replacement (patching). Free when none is."""
    fn = hooks.get(name) if hooks else None
    if fn is None:
        return x
    out = fn(x)
    return x if out is None else out


class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding, in buffers
    allocated once (concatenating every step would copy the whole cache each token).
    `pos` counts real tokens (sink-token prefixes are cached but take no position): the rotary position of the
    next token. A cache that assigns positions itself (a rolling streaming cache) sets rotates_keys: attention
    then hands it keys before rotary, and it returns them rotated to their places in the cache."""

    rotates_keys = False

    def __init__(self, n_layer):
        self.buffers = [None] * n_layer  # (keys, values), each (B, n_kv_head, capacity, D)
        self.length = [0] * n_layer
        self.pos = 0

    def update(self, layer, k, v, window=0, n_fixed=0):
        """Append this pass's keys and values (B, Hkv, T, D); return all the layer holds. A windowed layer
        (window > 0) needs only its first n_fixed keys (sink tokens) and the last window - 1 before the new
        ones: when the buffer is full, the rest is dropped instead of growing it, so memory stays bounded."""
        B, H, T, D = k.shape
        n = self.length[layer]
        if window and self.buffers[layer] is not None and n + T > self.buffers[layer][0].size(2):
            n = self.drop_outside_window(layer, n_fixed, window - 1)
        if self.buffers[layer] is None or n + T > self.buffers[layer][0].size(2):  # grow by doubling
            grown = tuple(k.new_empty(B, H, 2 * (n + T), D) for _ in range(2))
            if n:
                grown[0][:, :, :n], grown[1][:, :, :n] = self.buffers[layer][0][:, :, :n], self.buffers[layer][1][:, :, :n]
            self.buffers[layer] = grown
        keys, values = self.buffers[layer]
        keys.narrow(2, n, T).copy_(k)  # narrow: one view op where indexing [:, :, n:n + T] takes three
        values.narrow(2, n, T).copy_(v)
        self.length[layer] = n + T
        return keys.narrow(2, 0, n + T), values.narrow(2, 0, n + T)

    def drop_outside_window(self, layer, n_fixed, n_recent):
        """Keep the first n_fixed and the last n_recent positions of a layer, moved to the buffer's front."""
        n = self.length[layer]
        if n > n_fixed + n_recent:
            for buffer in self.buffers[layer]:
                buffer[:, :, n_fixed:n_fixed + n_recent] = buffer[:, :, n - n_recent:n].clone()  # may overlap
            self.length[layer] = n = n_fixed + n_recent
        return n

    def advance(self, T):
        """After a forward pass of T new real tokens."""
        self.pos += T


# ----------------------------------------------------------------------------------------------------
# attention


class CausalSelfAttention(nn.Module):
    """Causal self-attention with H query heads and n_kv_head key/value heads (grouped-query attention: query
    head h reads key/value head h // (H / n_kv_head); plain multi-head attention when they are equal)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        C, H, Hkv, D = config.n_embd, config.n_head, config.kv_heads, config.head_size
        self.n_head, self.n_kv_head, self.head_size, self.layer_idx = H, Hkv, D, layer_idx
        self.sink, self.attn_fn, self.attn_gate = config.sink, config.attn_fn, config.attn_gate
        self.window = config.window_of(layer_idx)  # 0 = full attention
        self.n_fixed = config.n_sink_tokens if config.sink == "token" else 0  # keys outside the window's count
        self.dropout = config.dropout
        self.c_attn = nn.Linear(C, C + 2 * Hkv * D, bias=config.bias or config.qkv_bias)  # queries, keys, values
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # normalise each head's queries and keys (bounds the attention logits)
            self.q_norm, self.k_norm = RMSNorm(D, eps=config.norm_eps), RMSNorm(D, eps=config.norm_eps)
        # --- sink parameters: one extra softmax column per head (docs/sinks.md) ---
        # The slot is one more key/value position, so like every key and value it has one per key/value head
        # (the fused GQA kernel and the KV cache run unchanged); the sink logit, a per-head scalar, has one per
        # query head, as in gpt-oss (which uses GQA).
        if config.sink == "logit":  # gpt-oss: a learned logit s with value 0
            self.sink_logit = nn.Parameter(torch.zeros(H))
        if config.sink in ("kv_bias", "k_bias"):  # Sun et al. / Gu et al.: a learned key (and value)
            self.k_slot = nn.Parameter(torch.randn(Hkv, D) * 0.02)
        if config.sink == "kv_bias":
            self.v_slot = nn.Parameter(torch.randn(Hkv, D) * 0.02)
        # --- output gate (Qiu et al. G1): o' = o * sigmoid(x W_g + b_g), per head or per channel ---
        if config.attn_gate != "none":  # always a bias, even in a bias-free model: it is what holds a retrofitted
            self.c_gate = nn.Linear(C, H if config.attn_gate == "headwise" else C, bias=True)  # gate open
        self.hook_fns = {}  # shared with the enclosing Block

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self.c_attn(x).split([C, Hkv * D, Hkv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k, v = (t.view(B, T, Hkv, D).transpose(1, 2) for t in (k, v))  # (B, Hkv, T, D)
        if hasattr(self, "q_norm"):  # back to v's dtype: CUDA autocast runs rms_norm in float32, and the KV
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # cache would keep float32 keys
        if rope is not None:
            q = apply_rope(q, *rope)
            if cache is None or not cache.rotates_keys:  # a rolling cache rotates its keys to their cache places
                k = apply_rope(k, *rope)
        q, k, v = hook(self.hook_fns, "q", q), hook(self.hook_fns, "k", k), hook(self.hook_fns, "v", v)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, self.window, self.n_fixed)
        if self.attn_fn != "softmax" or "scores" in self.hook_fns or "pattern" in self.hook_fns:
            y = self.attend_eager(q, k, v)
        elif self.sink in SLOT_SINKS:
            y = self.attend_slot_sdpa(q, k, v)
        else:
            y = self.sdpa(q, k, v, n_fixed=self.n_fixed)
        y = y.transpose(1, 2)  # (B, T, H, D)
        if self.attn_gate != "none":
            y = y * torch.sigmoid(self.c_gate(x)).view(B, T, H, -1)
        y = hook(self.hook_fns, "attn_z", hook(self.hook_fns, "z", y).reshape(B, T, C))
        if "head_out" in self.hook_fns:  # c_proj as a sum of per-head shares (H times its output's memory)
            shares = torch.einsum("bthd,chd->bthc", y.reshape(B, T, H, D), self.c_proj.weight.view(C, H, D))
            y = hook(self.hook_fns, "head_out", shares).sum(2)
            return self.resid_dropout(y if self.c_proj.bias is None else y + self.c_proj.bias)
        return self.resid_dropout(self.c_proj(y))

    def banded(self, n_keys, n_fixed):
        """Whether the window hides any key: some query is at least `window` positions past a real key."""
        return 0 < self.window < n_keys - n_fixed

    def sdpa(self, q, k, v, scale=None, n_fixed=0):
        """Fused causal attention; k/v may start with cached or prepended positions (lower-right mask) and may
        have fewer heads than q (GQA, which the kernel reads without repeating them). A sliding window becomes a
        banded mask (its first n_fixed keys always visible); on CUDA under torch.compile, a FlexAttention
        block mask."""
        Tq, Tk = q.size(2), k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if self.banded(Tk, n_fixed):
            if q.is_cuda and torch.compiler.is_compiling() and dropout_p == 0.0 and q.size(-1) in FLEX_HEAD_SIZES:
                return flex_window_attention(q, k, v, self.window, n_fixed, scale)
            mask = causal_mask(Tq, Tk, q.device, self.window, n_fixed)
        else:
            mask = None if Tq == Tk or Tq == 1 else causal_mask(Tq, Tk, q.device)
        gqa = k.size(1) != q.size(1)
        if gqa and not gqa_in_kernel(q, mask):
            group = q.size(1) // k.size(1)
            k, v, gqa = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
        if mask is None and Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale,
                                                  enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)

    def slot_key_value(self, dtype):
        """The extra key and value (n_kv_head, D) that every query sees. softmax1 is a zero key (logit 0) and a
        zero value."""
        zeros = torch.zeros(self.n_kv_head, self.head_size, dtype=dtype, device=self.c_attn.weight.device)
        k_slot = self.k_slot.to(dtype) if hasattr(self, "k_slot") else zeros
        v_slot = self.v_slot.to(dtype) if hasattr(self, "v_slot") else zeros
        return k_slot, v_slot

    def attend_slot_sdpa(self, q, k, v):
        """Attention with one extra key/value slot, exact and on the fused kernel. The slot is prepended to the
        keys and values; without a cache a dummy query row is prepended too, so the plain causal kernel applies
        and the dummy row's output is dropped. The learned sink logit s_h becomes a slot column through one
        extra head channel (8 on CUDA, whose fused kernels want multiples of 8): query head h carries s_h there,
        real keys 0, the slot key 1 / scale, so q.k_slot * scale = s_h. Few ops: on small models their count,
        not the bytes copied, is what costs."""
        B, H, Tq, D = q.shape
        Hkv = k.size(1)
        scale = 1.0 / math.sqrt(D)
        k_slot, v_slot = self.slot_key_value(q.dtype)
        if self.sink == "logit":
            extra = 8 if q.is_cuda else 1
            logit = self.sink_logit.to(q.dtype).view(1, H, 1, 1).expand(B, H, Tq, 1)
            q = torch.cat([q, logit, q.new_zeros(B, H, Tq, extra - 1)], dim=-1)
            k, v = F.pad(k, (0, extra)), F.pad(v, (0, extra))
            k_slot = F.pad(k_slot.new_full((Hkv, 1), 1.0 / scale), (D, extra - 1))
            v_slot = v_slot.new_zeros(Hkv, D + extra)
        k = torch.cat([k_slot.view(1, Hkv, 1, -1).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([v_slot.view(1, Hkv, 1, -1).expand(B, -1, -1, -1), v], dim=2)
        if k.size(2) == Tq + 1 and not self.banded(k.size(2), 1):  # no cached keys: dummy query row + plain
            q = torch.cat([q.new_zeros(B, H, 1, q.size(-1)), q], dim=2)  # causal kernel
            y = self.sdpa(q, k, v, scale=scale, n_fixed=1)[:, :, 1:]
        else:
            y = self.sdpa(q, k, v, scale=scale, n_fixed=1)
        return y[..., :D]

    def attend_eager(self, q, k, v):
        """Attention written out: scores, slot column, mask, softmax/sigmoid/relu, weighted sum.
        Used for attn_fn != softmax and whenever an analysis hook wants the scores or the pattern."""
        B, H, Tq, D = q.shape
        group = H // k.size(1)
        k_slot, v_slot = self.slot_key_value(q.dtype)
        if group > 1:  # each key/value head serves `group` consecutive query heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            k_slot, v_slot = k_slot.repeat_interleave(group, dim=0), v_slot.repeat_interleave(group, dim=0)
        Tk = k.size(2)
        scale = 1.0 / math.sqrt(D)
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
        visible = causal_mask(Tq, Tk, q.device, self.window, self.n_fixed)
        if self.sink in SLOT_SINKS:  # the slot is column 0, visible to every query
            if self.sink == "logit":
                slot_scores = self.sink_logit.to(q.dtype).view(1, H, 1, 1).expand(B, H, Tq, 1)
            else:
                slot_scores = (q @ k_slot[None, :, :, None]) * scale
            scores = torch.cat([slot_scores, scores], dim=-1)
            v = torch.cat([v_slot.view(1, H, 1, D).expand(B, -1, -1, -1), v], dim=2)
            visible = F.pad(visible, (1, 0), value=True)
        scores = scores.masked_fill(~visible, float("-inf"))
        scores = hook(self.hook_fns, "scores", scores)
        if self.attn_fn == "softmax":
            pattern = F.softmax(scores, dim=-1)
        elif self.attn_fn == "sigmoid":
            pattern = torch.sigmoid(scores)  # masked entries: sigmoid(-inf) = 0
        else:  # relu, divided by the number of keys each query sees
            pattern = F.relu(scores) / visible.sum(-1, keepdim=True)
        pattern = hook(self.hook_fns, "pattern", pattern)
        return self.attn_dropout(pattern) @ v


# ----------------------------------------------------------------------------------------------------
# MLP and block


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, hidden = config.n_embd, config.hidden_size
        self.act = config.mlp_act
        self.c_fc = nn.Linear(C, 2 * hidden if self.act == "swiglu" else hidden, bias=config.bias)  # swiglu: gate, up
        self.c_proj = nn.Linear(hidden, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.hook_fns = {}  # shared with the enclosing Block

    def forward(self, x):
        h = hook(self.hook_fns, "mlp_pre", self.c_fc(x))
        if self.act == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU, so logits match the released weights
        elif self.act == "gelu_exact":
            h = F.gelu(h)  # erf GELU, as nanoGPT uses; about 2x cheaper than tanh's on CPUs
        elif self.act == "relu":
            h = F.relu(h)
        elif self.act == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        h = hook(self.hook_fns, "mlp_post", h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.post_norm = config.norm_pos == "post"
        self.parallel = config.parallel_residual
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        if config.sink == "bos_override":  # L. Dial: the residual at document starts is a learned vector
            self.bos_resid = nn.Parameter(torch.zeros(config.n_embd))
        self.hook_fns = {}  # hook point -> function; one dict shared with attn and mlp (GPT.hooks fills it)
        self.attn.hook_fns = self.mlp.hook_fns = self.hook_fns

    def forward(self, x, rope=None, cache=None, is_bos=None):
        x = hook(self.hook_fns, "resid_pre", x)
        if self.post_norm:  # original transformer: norm after each residual add
            x = hook(self.hook_fns, "resid_mid", hook(self.hook_fns, "ln_1", self.ln_1(
                x + hook(self.hook_fns, "attn_out", self.attn(x, rope, cache)))))
            x = hook(self.hook_fns, "ln_2", self.ln_2(x + hook(self.hook_fns, "mlp_out", self.mlp(x))))
        elif self.parallel:  # GPT-NeoX: the MLP reads the block's input too, not attention's sum
            h = hook(self.hook_fns, "ln_1", self.ln_1(x))
            mlp_in = hook(self.hook_fns, "ln_2", self.ln_2(x))
            x = hook(self.hook_fns, "resid_mid", x + hook(self.hook_fns, "attn_out", self.attn(h, rope, cache)))
            x = x + hook(self.hook_fns, "mlp_out", self.mlp(mlp_in))
        else:
            h = hook(self.hook_fns, "ln_1", self.ln_1(x))
            x = hook(self.hook_fns, "resid_mid", x + hook(self.hook_fns, "attn_out", self.attn(h, rope, cache)))
            h = hook(self.hook_fns, "ln_2", self.ln_2(x))
            x = x + hook(self.hook_fns, "mlp_out", self.mlp(h))
        if is_bos is not None:
            x = torch.where(is_bos[..., None], self.bos_resid.to(x.dtype), x)
        return hook(self.hook_fns, "resid_post", x)


# ----------------------------------------------------------------------------------------------------
# GPT


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, C),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos_emb == "learned":
            self.transformer.wpe = nn.Embedding(config.n_positions, C)
        if config.pos_emb == "rope":
            cos, sin = rope_tables(config.rotary_dims, config.n_positions, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.sink == "token":  # StreamingLLM / registers: learned vectors prepended to every sequence
            self.sink_tokens = nn.Parameter(torch.randn(config.n_sink_tokens, C) * 0.02)
        self.lm_head = nn.Linear(C, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.hook_fns = {}  # the global hook points (GLOBAL_HOOK_POINTS)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def n_prefix(self):
        """Residual-stream positions before the first real token (the learned sink tokens)."""
        return self.config.n_sink_tokens if self.config.sink == "token" else 0

    @property
    def n_slot_columns(self):
        """Attention-pattern columns that belong to the dedicated sink, placed before position 0."""
        return self.n_prefix or (1 if self.config.sink in SLOT_SINKS else 0)

    def num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default (they cost no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self.transformer, "wpe"):
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6N for the weights plus 12 L H Q T for attention (PaLM appendix B), where a
        windowed layer attends over its window instead of T."""
        cfg = self.config
        attended = sum(min(window or seq_len, seq_len) for window in cfg.layer_windows())
        return 6 * self.num_params() + 12 * cfg.n_head * cfg.head_size * attended

    def forward(self, idx, targets=None, cache=None, last_only=False):
        B, T = idx.shape
        cfg = self.config
        start = cache.pos if cache is not None else 0
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={cfg.block_size}")
        start += cfg.pos_offset  # the position of this pass's first token
        x = self.transformer.wte(idx)
        if cfg.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        x = hook(self.hook_fns, "embed", x)
        n_prefix = self.n_prefix if start == cfg.pos_offset else 0  # sink tokens enter once, then live in the cache
        if n_prefix:
            x = torch.cat([self.sink_tokens.to(x.dtype).expand(B, -1, -1), x], dim=1)
        x = self.transformer.drop(x)
        rope = self.rope_for(start, T, n_prefix) if cfg.pos_emb == "rope" else None
        is_bos = (idx == cfg.bos_token) if cfg.sink == "bos_override" else None
        for block in self.transformer.h:
            x = block(x, rope, cache, is_bos)
        if cache is not None:
            cache.advance(T)
        x = hook(self.hook_fns, "ln_f", self.transformer.ln_f(x))
        x = x[:, n_prefix:]
        if last_only:  # generation needs only the last position's logits
            x = x[:, -1:]
        logits = self.lm_head(x)[..., : cfg.vocab_size]
        if cfg.logit_softcap > 0:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def rope_for(self, start, T, n_prefix):
        """apply_rope's tables for the positions in this forward pass; sink-token prefixes sit at rotation 0."""
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        if n_prefix:
            cos = torch.cat([cos.new_ones(n_prefix, cos.size(1)), cos])
            sin = torch.cat([sin.new_zeros(n_prefix, sin.size(1)), sin])
        return rotation(cos, sin)

    def crop_block_size(self, block_size):
        """Shorten the context (e.g. GPT-2's 1024 to a smaller block_size) by dropping position embeddings. A
        window longer than the new context hides nothing there: it becomes full attention (0), which the config
        accepts (Mistral's 4096 at block_size 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        fitted = [0 if window > block_size else window for window in self.config.window_pattern]
        self.config.attn_window = fitted if isinstance(self.config.attn_window, (list, tuple)) else fitted[0]
        for layer, block in enumerate(self.transformer.h):
            block.attn.window = self.config.window_of(layer)
        rows = self.config.n_positions
        if hasattr(self.transformer, "wpe"):
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:rows])
        if hasattr(self, "rope_cos"):
            self.rope_cos, self.rope_sin = self.rope_cos[:rows], self.rope_sin[:rows]

    # ------------------------------------------------------------------------------------------------
    # analysis hooks (TransformerLens-style, scoped): the points and their shapes are in HOOK_POINTS

    def hook_names(self):
        return list(GLOBAL_HOOK_POINTS) + [f"h.{layer}.{point}" for layer in range(self.config.n_layer)
                                           for point in HOOK_POINTS]

    def hook_table(self, name):
        """(the dict that holds the hook of point `name`, the key in it); KeyError for an unknown name."""
        parts = name.split(".")
        if len(parts) == 1 and name in GLOBAL_HOOK_POINTS:
            return self.hook_fns, name
        if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and parts[2] in HOOK_POINTS:
            layer = int(parts[1])
            if layer < self.config.n_layer:
                return self.transformer.h[layer].hook_fns, parts[2]
        raise KeyError(f"unknown hook point {name!r}; points are {', '.join(GLOBAL_HOOK_POINTS)} and "
                       f"'h.<layer>.<point>' with point in {', '.join(HOOK_POINTS)}")

    @contextlib.contextmanager
    def hooks(self, fns):
        """Hooks for the duration of a with-block: {name: fn}, e.g. {"h.3.resid_post": fn}. fn(tensor) returns
        None (a read) or a tensor that replaces it (a patch). On exit exactly these hooks are removed, also after
        an error; blocks nest, but a second hook on a point that already has one is a ValueError."""
        placed = []
        try:
            for name, fn in fns.items():
                table, point = self.hook_table(name)
                if point in table:
                    raise ValueError(f"hook point {name!r} already has a hook (an enclosing hooks() block?)")
                table[point] = fn
                placed.append((table, point))
            yield self
        finally:
            for table, point in placed:
                del table[point]

    def run_with_cache(self, idx, names, targets=None):
        """One forward with read hooks at `names`: (logits, loss, {name: the tensor there, detached})."""
        cache = {}
        with self.hooks({name: (lambda x, name=name: cache.__setitem__(name, x.detach())) for name in names}):
            logits, loss = self(idx, targets)
        return logits, loss, cache

    # ------------------------------------------------------------------------------------------------
    # generation

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 use_cache=True):
        """Sample max_new_tokens after idx (B, T). temperature 0 = greedy. With use_cache, earlier keys and
        values are kept; once the context is full it is recomputed on the last block_size tokens."""
        with torch.inference_mode():  # cheaper per op than no_grad: decode is hundreds of small ops per token
            out = self._generate(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache)
        return out.clone()  # an ordinary tensor again: usable as the input of a forward that trains

    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache):
        block_size = self.config.block_size
        cache, logits = None, None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.pos < block_size:
                logits, _ = self(idx[:, -1:], cache=cache)
            else:
                cache = KVCache(self.config.n_layer) if use_cache else None
                logits, _ = self(idx[:, -block_size:], cache=cache, last_only=True)
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_token], dim=1)
        return idx

    # ------------------------------------------------------------------------------------------------
    # starting sink options from a pretrained model

    @torch.no_grad()
    def init_sinks_from_pretrained(self):
        """Start each new mechanism at the pretrained model's function, or as close as it allows, where its
        gradient is not saturated (each start and its measured cost: docs/explicit_sinks.md)."""
        cfg = self.config
        for block in self.transformer.h:
            attn = block.attn
            if cfg.sink == "logit":  # logit 0 with value 0: softmax1 at the start, as the zero key/value slots
                attn.sink_logit.zero_()
            if cfg.sink in ("kv_bias", "k_bias"):  # a zero key and value: softmax1 at the start
                attn.k_slot.zero_()
                if hasattr(attn, "v_slot"):
                    attn.v_slot.zero_()
            if cfg.attn_gate != "none":  # gate at sigmoid(0) = 1/2, where its slope is largest (1/4), and
                attn.c_gate.weight.zero_()  # c_proj doubled: (2 W) (y / 2) = W y, the pretrained output exactly
                attn.c_gate.bias.zero_()
                attn.c_proj.weight.mul_(2.0)
        if cfg.sink == "token":  # the token the model already uses as a sink: BOS at position 0 (exact with
            wpe = self.transformer.wpe.weight[0] if hasattr(self.transformer, "wpe") else 0.0  # pos_offset=1)
            self.sink_tokens.copy_((self.transformer.wte.weight[cfg.bos_token] + wpe).expand_as(self.sink_tokens))
        if cfg.sink == "bos_override":  # the model's own residual at a BOS in position 0, after each block
            names = [f"h.{layer}.resid_post" for layer in range(cfg.n_layer)]
            self.config.sink = "none"  # run the plain model once to read them
            try:
                _, _, cache = self.run_with_cache(torch.tensor([[cfg.bos_token]], device=self.lm_head.weight.device),
                                                  names)
            finally:
                self.config.sink = "bos_override"
            for name, block in zip(names, self.transformer.h):
                block.bos_resid.copy_(cache[name][0, 0])


@torch.no_grad()
def bos_as_slot(model):
    """The model's BOS at position 0 as an explicit key/value slot: a new GPT with sink='kv_bias' whose slot in
    each layer holds the key (after qk_norm and rotary, the identity at position 0) and the value that BOS has
    there, and whose real tokens start at position 1. BOS at position 0 sees only itself, so those keys and values
    are constants of the model: on the real tokens the new model computes what the old one computes with BOS
    first, without ever computing BOS's residual stream (where the massive activation lives)."""
    cfg = model.config
    windowed = any(cfg.layer_windows())  # [0, 0] is full attention
    refusals = [(cfg.sink != "none", f"sink={cfg.sink!r}: the model already has a dedicated sink"),
                (windowed, f"attn_window={cfg.attn_window!r}: a BOS leaves the window, a slot would not"),
                (cfg.pos_offset != 0, f"pos_offset={cfg.pos_offset}: its BOS is already a slot"),
                (cfg.attn_fn != "softmax", f"attn_fn={cfg.attn_fn!r}: only softmax attention is converted")]
    for refused, reason in refusals:
        if refused:
            raise ValueError(f"cannot convert BOS into a slot: {reason}")
    names = [f"h.{layer}.{point}" for layer in range(cfg.n_layer) for point in ("k", "v")]
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    try:
        _, _, seen = model.run_with_cache(torch.tensor([[cfg.bos_token]], device=device), names)
    finally:
        model.train(was_training)
    converted = GPT(GPTConfig(**dict(cfg.to_dict(), sink="kv_bias", pos_offset=1, block_size=cfg.block_size - 1)))
    converted.to(device=device, dtype=model.lm_head.weight.dtype)
    state = dict(model.state_dict())
    for layer in range(cfg.n_layer):  # the keys and values of BOS: (1, Hkv, 1, D) -> (Hkv, D)
        state[f"transformer.h.{layer}.attn.k_slot"] = seen[f"h.{layer}.k"][0, :, 0]
        state[f"transformer.h.{layer}.attn.v_slot"] = seen[f"h.{layer}.v"][0, :, 0]
    converted.load_state_dict(state)
    return converted.train(was_training)


# the dedicated sink parameters, the output gate's included (the optimizer gives them their own group, with
# sink_lr_mult and no weight decay by default)
SINK_PARAMETERS = ("sink_logit", "k_slot", "v_slot", "bos_resid", "sink_tokens", "c_gate")


def is_sink_parameter(name):
    return any(part in name for part in SINK_PARAMETERS)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): greedy at temperature 0, else temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
