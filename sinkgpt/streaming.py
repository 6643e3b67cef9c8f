"""
Streaming evaluation (StreamingLLM, Xiao et al. 2024): the loss over a text much longer than the attention
window, when the model keeps only the first `keep` positions (attention sinks) and the `window` most recent ones.

    result = stream_losses(model, ids, keep=4, window=256)   # per-token losses, the route taken, tokens/s

Routes, by how the model encodes positions:
- rotary (pos_emb='rope'): a RollingKVCache, decoding token by token without recomputing anything. Keys are
  cached before rotary and rotated to their place in the cache on every step, StreamingLLM's rule: the kept
  first tokens sit at positions 0..keep-1 (from pos_offset on), the window right after them, the current token
  last, so no position ever exceeds keep + window - 1 (+ pos_offset).
- no positions (pos_emb='none'): the same cache, nothing to rotate.
- learned absolute positions: a cached key carries its position in its residual stream, so the honest comparison
  is a sliding window recomputed over the kept tokens (first `keep` + last `window`, positions 0..) for every
  token: exact, and O(window) work per token.
A dedicated sink (a slot of sink=logit/softmax1/kv_bias/k_bias, or sink tokens) is always kept and does not
count against `keep`.

May import: model, sinkgpt.generation, sinkgpt.runtime.
"""

import time

import torch
import torch.nn.functional as F

from model import KVCache, apply_rope, rotation
from sinkgpt.generation import decode_layout
from sinkgpt.runtime import synchronize


class RollingKVCache(KVCache):
    """A KV cache that keeps a sink-token prefix, the first `keep` real positions and the `window` most recent
    ones. With rotary tables it stores keys before rotation and rotates them to their cache positions on read."""

    def __init__(self, n_layer, keep, window, n_prefix=0, rope=None):
        super().__init__(n_layer)
        self.keep, self.window, self.n_prefix = keep, window, n_prefix
        self.rope = rotation(*rope) if rope is not None else None  # from the model's (cos, sin) tables
        self.rotates_keys = rope is not None
        self.kept = 0  # real positions held (the same in every layer)
        self.largest = 0  # the most positions any layer has held at once (prefix included)

    def update(self, layer, k, v, window=0, n_fixed=0):
        """Append and evict; a windowed layer's own window (window, n_fixed) is its mask's job, applied to what
        this cache returns."""
        if self.buffers[layer] is None:
            keys, values = k, v
        else:
            keys, values = (torch.cat([old, new], dim=2) for old, new in zip(self.buffers[layer], (k, v)))
        real = keys.size(2) - self.n_prefix
        if real > self.keep + self.window:  # evict the oldest window positions, never the first `keep`
            drop = real - self.keep - self.window
            start = self.n_prefix + self.keep
            keys = torch.cat([keys[:, :, :start], keys[:, :, start + drop:]], dim=2)
            values = torch.cat([values[:, :, :start], values[:, :, start + drop:]], dim=2)
            real = self.keep + self.window
        self.buffers[layer], self.kept = (keys, values), real
        self.largest = max(self.largest, keys.size(2))
        if self.rope is None:
            return keys, values
        cos, sin = self.rope
        rotated = apply_rope(keys[:, :, self.n_prefix:], cos[:real], sin[:real])  # the prefix: rotation 0
        return torch.cat([keys[:, :, :self.n_prefix], rotated], dim=2), values

    def advance(self, T):
        """The next token's position: its place in the cache once this step's eviction is done."""
        self.pos = min(self.kept, self.keep + self.window - 1)


def upcast(logits):
    """The loss in float32 at least (float64 stays float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def route(model):
    return {"rope": "rolling cache, positions within the cache", "none": "rolling cache, no positions",
            "learned": "sliding window recomputed over the kept tokens"}[model.config.pos_emb]


@torch.no_grad()
def stream_losses(model, ids, keep, window):
    """Next-token losses (len(ids) - 1,) of a long 1-D token sequence under a window of `window` recent tokens
    plus the first `keep`; also the route, the largest cache held (positions, slot and prefix included) and the
    tokens per second of the streaming pass."""
    if keep + window > model.config.block_size:
        raise ValueError(f"keep + window = {keep + window} is longer than the model's context "
                         f"({model.config.block_size})")
    if window < 1 or keep < 0:
        raise ValueError(f"window must be >= 1 and keep >= 0, got {window} and {keep}")
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, device=device)
    synchronize(device)
    t0 = time.perf_counter()
    if model.config.pos_emb == "learned":
        losses, largest = recomputed_window_losses(model, ids, keep, window), None
    else:
        losses, largest = cached_losses(model, ids, keep, window)
    synchronize(device)  # the device's queued work belongs to the time
    seconds = time.perf_counter() - t0
    return {"losses": losses, "route": route(model), "largest_cache": largest,
            "tokens_per_s": len(losses) / seconds if seconds > 0 else float("inf")}


def cached_losses(model, ids, keep, window):
    offset = model.config.pos_offset  # the cache's first real position (1 where a BOS became a slot)
    rope = (model.rope_cos[offset:], model.rope_sin[offset:]) if model.config.pos_emb == "rope" else None
    cache = RollingKVCache(model.config.n_layer, keep, window, model.n_prefix, rope)
    first = min(len(ids) - 1, keep + window)  # the opening stretch fits the cache: one forward pass
    with decode_layout(model):  # token-by-token decoding, as sample.py does it
        logits, _ = model(ids[None, :first], cache=cache)
        losses = [F.cross_entropy(upcast(logits[0]), ids[1:first + 1], reduction="none")]
        for t in range(first, len(ids) - 1):
            logits, _ = model(ids[None, t:t + 1], cache=cache)
            losses.append(F.cross_entropy(upcast(logits[0]), ids[t + 1:t + 2], reduction="none"))
    slot = 1 if model.n_slot_columns and not model.n_prefix else 0  # a slot column is added by attention itself
    return torch.cat(losses), cache.largest + slot


def recomputed_window_losses(model, ids, keep, window):
    losses = []
    for t in range(len(ids) - 1):
        if t < keep + window:
            context = ids[:t + 1]
        else:
            context = torch.cat([ids[:keep], ids[t - window + 1:t + 1]])
        logits, _ = model(context[None], last_only=True)
        losses.append(F.cross_entropy(upcast(logits[0, -1:]), ids[t + 1:t + 2], reduction="none"))
    return torch.cat(losses)
