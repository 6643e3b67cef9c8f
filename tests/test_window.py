"""Sliding-window attention (attn_window): exact against the float64 reference of test_sinks for every sink option,
GQA and rotary, forward and backward; a slot or sink tokens always visible and outside the window's count; the KV
cache equal to the full forward and bounded in memory; the FlexAttention path equal to the banded mask; streaming a
windowed model with nothing kept equal to its plain forward; bad windows refused with one line."""
import warnings

import pytest
import torch

from model import GPT, SLOT_SINKS, GPTConfig, KVCache, causal_mask, flex_window_attention
from sinkgpt.streaming import stream_losses
from test_sinks import (TOL, check_against_reference, check_gpt_against_reference, make_attention, make_gpt,
                        mech_id, rel_err, rope_table, sample_idx)

ATTENTION_OPTIONS = [dict(sink=s) for s in ("none",) + SLOT_SINKS]
ATTENTION_OPTIONS += [dict(sink="logit", attn_gate="headwise"), dict(sink="kv_bias", attn_gate="elementwise"),
                      dict(attn_fn="sigmoid"), dict(attn_fn="relu", sink="kv_bias"), dict(sink="k_bias", qk_norm=True)]


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("H,n_kv_head", [(2, 2), (4, 2), (4, 1)], ids=["H2", "H4-kv2", "H4-kv1"])
@pytest.mark.parametrize("options", ATTENTION_OPTIONS, ids=[mech_id(m) for m in ATTENTION_OPTIONS])
def test_windowed_attention_matches_reference(options, H, n_kv_head, window):
    attn = make_attention(H, seed=H + window, n_kv_head=n_kv_head, attn_window=window, **options)
    paths = ("fast", "eager") if options.get("attn_fn", "softmax") == "softmax" else ("eager",)
    for path in paths:
        for B, T in ((1, 1), (3, 5), (2, 17)):
            check_against_reference(attn, B, T, seed=100 * B + T, path=path)


@pytest.mark.parametrize("sink", ("none",) + SLOT_SINKS)
def test_windowed_attention_with_rope_matches_reference(sink):
    attn = make_attention(2, seed=3, C_per_head=8, sink=sink, n_kv_head=1, attn_window=4)
    for path in ("fast", "eager"):
        check_against_reference(attn, 3, 13, seed=5, path=path, rope=rope_table(torch.arange(13), 8))


def test_the_window_really_hides_old_keys_and_never_the_slot():
    """The output at the last position does not depend on a token W or more positions back, but does depend on
    the one W - 1 back; a sink logit so large that it takes all the mass stays visible to every query."""
    attn = make_attention(2, seed=1, attn_window=4, sink="logit")
    x = torch.randn(1, 10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    far, near = x.clone(), x.clone()
    far[0, 5] += 1.0  # 4 positions before the last (position 9): outside a window of 4
    near[0, 6] += 1.0  # 3 positions before: inside
    base = attn(x)[0, -1]
    assert torch.equal(attn(far)[0, -1], base)
    assert (attn(near)[0, -1] - base).abs().max() > 1e-3
    with torch.no_grad():
        attn.sink_logit.fill_(60.0)  # the slot takes (almost) all the mass in every row: output = c_proj's bias
    assert rel_err(attn(x), attn.c_proj.bias.expand(1, 10, 16)) < 1e-12


WINDOWED_GPTS = [dict(sink=s, attn_window=3) for s in ("none", "token", "logit", "kv_bias", "bos_override")]
WINDOWED_GPTS += [dict(sink="token", n_sink_tokens=2, pos_emb="rope", attn_window=2),
                  dict(sink="softmax1", pos_emb="rope", qk_norm=True, attn_window=[3, 0]),
                  dict(n_head=4, n_kv_head=2, sink="k_bias", attn_gate="headwise", attn_window=[0, 2]),
                  dict(n_head=4, n_kv_head=1, attn_fn="relu", sink="kv_bias", attn_window=4),
                  dict(attn_fn="sigmoid", sink="token", attn_window=3)]
# GPT-NeoX's parallel block with partial rotary, and Qwen2's q/k/v biases with windows on some layers
WINDOWED_GPTS += [dict(pos_emb="rope", rotary_pct=0.5, parallel_residual=True, sink="logit", attn_window=3),
                  dict(n_head=4, n_kv_head=2, pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", bias=False,
                       qkv_bias=True, sink="kv_bias", attn_window=[0, 2])]


@pytest.mark.parametrize("options", WINDOWED_GPTS, ids=[mech_id(m) for m in WINDOWED_GPTS])
def test_windowed_model_matches_reference(options):
    model = make_gpt(**options)
    idx = sample_idx(model, 2, 10, seed=4, bos_positions=[(0, 0), (1, 6)])
    check_gpt_against_reference(model, idx, model.transformer.h[1].attn.c_proj.weight)


def test_a_per_layer_pattern_cycles_over_the_layers():
    cfg = GPTConfig(n_layer=5, n_head=2, n_embd=16, block_size=32, vocab_size=10, attn_window=[8, 0])
    assert [cfg.window_of(layer) for layer in range(5)] == [8, 0, 8, 0, 8]
    model = GPT(cfg)
    assert [block.attn.window for block in model.transformer.h] == [8, 0, 8, 0, 8]
    # MFU's attention FLOPs: 12 H D per key attended, a windowed layer attending over its window only
    full = GPT(GPTConfig(n_layer=5, n_head=2, n_embd=16, block_size=32, vocab_size=10))
    assert full.flops_per_token(32) - model.flops_per_token(32) == 12 * 2 * 8 * 3 * (32 - 8)
    assert model.flops_per_token(4) == full.flops_per_token(4)  # a window longer than the sequence hides nothing


@pytest.mark.parametrize("eager", [False, True], ids=["fast", "eager"])
@pytest.mark.parametrize("options", WINDOWED_GPTS, ids=[mech_id(m) for m in WINDOWED_GPTS])
def test_windowed_kv_cache_equals_full_forward(options, eager):
    """Prefill, chunks and single tokens through a cache small enough that the window drops keys on the way."""
    model = make_gpt(**options).eval()
    reads = {f"h.{layer}.scores": (lambda s: None) for layer in range(model.config.n_layer)} if eager else {}
    idx = sample_idx(model, 2, 20, seed=9, bos_positions=[(0, 0), (1, 0), (0, 6)])
    with model.hooks(reads):
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer)
        pieces, start = [], 0
        for size in (5, 3, 1, 1, 2, 1, 1, 4, 1, 1):
            pieces.append(model(idx[:, start:start + size], cache=cache)[0])
            start += size
    assert start == idx.size(1)
    assert rel_err(torch.cat(pieces, dim=1), full) <= TOL


def test_generation_keeps_only_the_window_in_the_cache():
    """Greedy decoding of 300 tokens: the same tokens as without a cache, while a windowed layer's buffer stays
    within twice (window + sink tokens + 1) positions; a full-attention layer's buffer holds every position."""
    model = make_gpt(sink="token", n_sink_tokens=2, attn_window=[6, 0], block_size=320, pos_emb="rope").eval()
    prompt = sample_idx(model, 1, 4, seed=1)
    cache_sizes = {}
    original = KVCache.update

    def recording_update(self, layer, k, v, *args):
        keys, values = original(self, layer, k, v, *args)
        cache_sizes[layer] = max(cache_sizes.get(layer, 0), self.buffers[layer][0].size(2))
        return keys, values

    KVCache.update = recording_update
    try:
        cached = model.generate(prompt, 300, temperature=0)
    finally:
        KVCache.update = original
    assert torch.equal(cached, model.generate(prompt, 300, temperature=0, use_cache=False))
    assert cache_sizes[0] <= 2 * (6 + 2 + 1)
    assert cache_sizes[1] >= 300


def test_flex_attention_path_equals_the_banded_mask():
    """The CUDA kernel's block mask (run unfused on a CPU) agrees with the banded SDPA mask, GQA, a
    prepended slot key and cached keys included."""
    gen = torch.Generator().manual_seed(0)
    for Tq, Tk, window, n_fixed in ((16, 16, 4, 0), (16, 17, 4, 1), (3, 20, 5, 2), (1, 9, 3, 0)):
        q = torch.randn(2, 4, Tq, 16, dtype=torch.float64, generator=gen)
        k, v = (torch.randn(2, 2, Tk, 16, dtype=torch.float64, generator=gen) for _ in range(2))
        mask = causal_mask(Tq, Tk, "cpu", window, n_fixed)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unfused implementation": expected off CUDA
            got = flex_window_attention(q, k, v, window, n_fixed, scale=None)
        assert rel_err(got, expected) <= TOL


STREAMED = [("none", "rope"), ("logit", "rope"), ("softmax1", "rope"), ("kv_bias", "none"), ("token", "none")]


@pytest.mark.parametrize("sink,pos_emb", STREAMED, ids=[f"{s}-{p}" for s, p in STREAMED])
def test_streaming_a_windowed_model_with_nothing_kept_is_its_plain_forward(sink, pos_emb):
    """A model with window W, streamed with keep=0 and window W, sees the same keys at the same relative
    distances as in its plain forward: the same losses, to the float32 rounding of the rotary tables (the angles
    differ, their differences do not). A window one shorter sees fewer keys and does not match. (A learned slot key
    or sink token is not rotated, so under rotary its score depends on the query's absolute position, which
    streaming changes: those are compared without positions.)"""
    model = make_gpt(sink=sink, pos_emb=pos_emb, attn_window=5, block_size=40).eval()
    ids = sample_idx(model, 1, 40, seed=3)[0]
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    plain = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="none")
    streamed = stream_losses(model, ids, keep=0, window=5)["losses"]
    assert rel_err(streamed, plain) <= 1e-6
    assert rel_err(stream_losses(model, ids, keep=0, window=4)["losses"], plain) > 1e-3


@pytest.mark.parametrize("value,message", [
    (64, "attn_window=64 is larger than the context"),
    (-1, "attn_window must be an int >= 0"),
    ([], "attn_window must be an int >= 0"),
    ([8, 2.5], "attn_window must be an int >= 0"),
])
def test_bad_windows_are_refused_naming_the_key(value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(block_size=32, attn_window=value)


def test_a_windowed_model_is_not_converted_into_a_slot():
    from model import bos_as_slot
    with pytest.raises(ValueError, match="attn_window=4: a BOS leaves the window"):
        bos_as_slot(make_gpt(attn_window=4))
    converted = bos_as_slot(make_gpt(attn_window=[0, 0]))  # a pattern of full layers only has no window
    assert converted.config.sink == "kv_bias" and converted.config.pos_offset == 1


def test_bigram_backcopy_masses_count_only_the_queries_that_see_bos():
    """In a layer with window 3, queries 3.. cannot see BOS: the dormant and active masses on BOS average over
    queries 1 and 2 only, while the slot, seen by every query, averages over all of them."""
    from sinkgpt.stats import bb_masses
    T = 6
    pattern = torch.zeros(1, 1, T, T + 1)  # one slot column, then the real keys
    pattern[0, 0, :3, 1] = 1.0  # queries 0-2 put everything on BOS
    pattern[0, 0, 3:, 0] = 1.0  # queries 3-5 (BOS out of reach) on the slot
    triggers = torch.tensor([[False, True, False, False, True, False]])
    windowed = bb_masses(pattern, triggers, n_slot=1, window=3)
    assert windowed["dormant_bos"].item() == 1.0 and windowed["active_bos"].item() == 1.0
    assert windowed["dormant_slot"].item() == pytest.approx(2 / 3)  # queries 2, 3, 5
    full = bb_masses(pattern, triggers, n_slot=1)
    assert full["dormant_bos"].item() == pytest.approx(1 / 3) and full["active_bos"].item() == 0.5


def test_a_trained_windowed_run_streams_with_nothing_kept_to_its_plain_forward(tmp_path, char_dataset, capsys):
    """train.py with attn_window=6 and rotary positions, then `analyze.py stream --keep 0 --window 6`: the
    streamed loss is the plain forward's on the same tokens."""
    import json

    import analyze
    from conftest import run_train
    from sinkgpt.checkpoint import load_model
    from sinkgpt.probes import stream_tokens
    out, report = tmp_path / "run", tmp_path / "report"
    assert run_train(out, char_dataset, pos_emb="rope", attn_window=6, block_size=64, max_iters=20,
                     eval_interval=20) == 0
    assert analyze.main(["stream", str(out), "--keep", "0", "--window", "6", "--tokens", "60", "--device", "cpu",
                         "--report", str(report)]) == 0
    streamed = json.loads((report / "stream.json").read_text())["rows"][0]["loss"]
    target = load_model(str(out), "cpu")
    ids, _ = stream_tokens(target, "cpu", n_tokens=60)
    with torch.no_grad():
        _, plain = target.model(ids[None, :-1], ids[None, 1:])
    assert abs(streamed - plain.item()) <= 1e-5 * plain.item()


def test_train_refuses_a_window_longer_than_the_context_in_one_line(tmp_path, char_dataset, capsys):
    from conftest import run_train
    assert run_train(tmp_path / "run", char_dataset, attn_window=[8, 65]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attn_window=65 is larger than the context (block_size=" in err[0], err


@pytest.mark.parametrize("window, cropped", [(12, 0), ([12, 0, 3], [0, 0, 3])])
def test_a_context_cropped_below_a_window_makes_it_full_attention_and_keeps_the_function(window, cropped):
    """block_size below a window (Mistral's 4096 trained at 256): the window hides nothing on the shorter context,
    so it becomes 0, the logits are unchanged, and the config stays one that a checkpoint can be loaded from."""
    model = make_gpt(n_layer=3, attn_window=window, pos_emb="rope").eval()
    idx = sample_idx(model, 2, 8, seed=3)
    with torch.no_grad():
        before, _ = model(idx)
        model.crop_block_size(8)
        after, _ = model(idx)
    assert model.config.attn_window == cropped and model.config.block_size == 8
    assert [block.attn.window for block in model.transformer.h] == [model.config.window_of(i) for i in range(3)]
    assert GPTConfig.from_dict(model.config.to_dict()) == model.config
    assert torch.equal(before, after)


def test_train_from_a_windowed_run_at_a_shorter_context(tmp_path, char_dataset, capsys):
    """A run started from a windowed run's weights at a block_size below its window gives a checkpoint that
    sample.py loads; a block_size above the source's context is one line."""
    import sample
    from conftest import run_train
    source, run = tmp_path / "source", tmp_path / "run"
    assert run_train(source, char_dataset, pos_emb="rope", attn_window=[16, 4], max_iters=2, eval_interval=2) == 0
    assert run_train(run, char_dataset, init_from=str(source), block_size=8, max_iters=2, eval_interval=2) == 0
    assert torch.load(run / "ckpt.pt", weights_only=True)["model_args"]["attn_window"] == [0, 4]
    capsys.readouterr()
    assert sample.main(["--out_dir", str(run), "--device", "cpu", "--num_samples", "1", "--max_new_tokens", "12",
                        "--start", "To be"]) == 0
    assert capsys.readouterr().out.startswith("To be")
    assert run_train(tmp_path / "longer", char_dataset, init_from=str(source), block_size=64, max_iters=2) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'block_size'=64 is longer than" in err[0] and "(32)" in err[0], err


def test_a_checkpoint_whose_window_the_model_refuses_is_one_line(tmp_path, char_dataset, capsys):
    """A checkpoint holding a window longer than its context (written before crops made it 0): sample.py and
    analyze.py say so in one line naming attn_window."""
    import analyze
    import sample
    from conftest import run_train
    assert run_train(tmp_path, char_dataset, attn_window=8, max_iters=2, eval_interval=2) == 0
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    checkpoint["model_args"]["block_size"] = 4
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    capsys.readouterr()
    assert sample.main(["--out_dir", str(tmp_path), "--device", "cpu", "--max_new_tokens", "2"]) == 1
    assert analyze.main(["patch", str(tmp_path), "--clean", "ab", "--corrupt", "ac", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "attn_window=8" in line for line in err), err
