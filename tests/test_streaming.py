"""sinkgpt.streaming: with a window as long as the text the streaming loss is the plain forward's; the rolling
cache never holds more than keep + window (+ the dedicated sink); every sink option and every position encoding
streams; StreamingLLM's position rule (the kept first tokens right before the window) holds."""
import pytest
import torch
import torch.nn.functional as F

from conftest import randomize, tiny
from sinkgpt.streaming import RollingKVCache, stream_losses

OPTIONS = [dict(), dict(sink="token", n_sink_tokens=2), dict(sink="logit"), dict(sink="softmax1"),
           dict(sink="kv_bias"), dict(sink="k_bias"), dict(sink="bos_override"), dict(attn_gate="headwise"),
           dict(attn_fn="sigmoid"), dict(n_head=4, n_kv_head=2, sink="kv_bias")]
POSITIONS = ["rope", "none", "learned"]


def model_and_text(pos_emb, seed=0, n=40, **options):
    model = randomize(tiny(pos_emb=pos_emb, block_size=64, **options), seed=seed).double().eval()
    ids = torch.randint(0, 36, (n,), generator=torch.Generator().manual_seed(seed + 1))
    ids[0] = model.config.bos_token
    return model, ids


def plain_losses(model, ids):
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    return F.cross_entropy(logits[0], ids[1:], reduction="none")


@pytest.mark.parametrize("pos_emb", POSITIONS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_a_window_as_long_as_the_text_gives_the_plain_loss(pos_emb, options):
    model, ids = model_and_text(pos_emb, **options)
    for keep, window in ((0, 40), (4, 36), (1, 63)):
        result = stream_losses(model, ids, keep, window)
        torch.testing.assert_close(result["losses"], plain_losses(model, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("pos_emb", ["rope", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_the_rolling_cache_holds_at_most_keep_plus_window(pos_emb, options):
    model, ids = model_and_text(pos_emb, n=60, **options)
    slot = 1 if model.n_slot_columns and not model.n_prefix else 0
    for keep, window in ((0, 8), (1, 8), (4, 12)):
        result = stream_losses(model, ids, keep, window)
        assert result["largest_cache"] == keep + window + model.n_prefix + slot
        assert len(result["losses"]) == 59 and torch.isfinite(result["losses"]).all()


@pytest.mark.parametrize("pos_emb", POSITIONS)
def test_each_streamed_token_sees_the_first_tokens_and_the_window_with_positions_from_0(pos_emb):
    """Token t's loss equals a plain forward over [first keep tokens] + [the last window tokens up to t]. For
    rotary models that is StreamingLLM's rule (positions within the cache), checked on one layer, where a cached
    key depends on its token and position only; for learned positions the window is recomputed, at any depth."""
    model, ids = model_and_text(pos_emb, n=50, n_layer=2 if pos_emb == "learned" else 1)
    keep, window = 3, 10
    losses = stream_losses(model, ids, keep, window)["losses"]
    for t in (keep + window, 25, 48):
        context = torch.cat([ids[:keep], ids[t - window + 1:t + 1]])
        with torch.no_grad():
            logits, _ = model(context[None])
        expected = F.cross_entropy(logits[0, -1:], ids[t + 1:t + 2])
        torch.testing.assert_close(losses[t], expected, rtol=0, atol=1e-10)


def test_the_cache_stores_keys_before_rotary_and_positions_stay_inside_the_window():
    model, ids = model_and_text("rope", n=30)
    cache = RollingKVCache(model.config.n_layer, 2, 5, rope=(model.rope_cos, model.rope_sin))
    with torch.no_grad():
        model(ids[None, :7], cache=cache)
        for t in range(7, 29):
            assert cache.pos == 6  # keep + window - 1: the next token's place once the oldest is evicted
            model(ids[None, t:t + 1], cache=cache)
    assert cache.kept == 7 and all(b[0].size(2) == 7 for b in cache.buffers)


def test_bad_windows_are_refused():
    model, ids = model_and_text("rope")
    with pytest.raises(ValueError, match="context"):
        stream_losses(model, ids, 10, 60)
    with pytest.raises(ValueError, match="window"):
        stream_losses(model, ids, 1, 0)
