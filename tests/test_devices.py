"""Device and dtype discipline without a GPU: the pieces that create tensors run on the `meta` device (which
raises on any mix with a CPU tensor, as CUDA does), and a tiny model runs in bfloat16 on the CPU through the
analysis, streaming, quantization and tracking with its statistics in float32 or float64."""
import json
import os

import pytest
import torch

from conftest import randomize, tiny
from sinkgpt import stats
from sinkgpt.measure import layer_reducer
from sinkgpt.quantize import input_observer, ptq_losses, weight_observer
from sinkgpt.streaming import RollingKVCache

META = torch.device("meta")


def on_meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=META, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# the meta device: every tensor a reducer creates follows its input


def test_moment_sums_stay_on_the_input_device():
    sums = stats.moment_sums(on_meta(2, 5, 8, dtype=torch.bfloat16))
    assert sums.device == META and sums.dtype == torch.float64 and sums.shape == (5,)


def test_pattern_and_activation_reducers_stay_on_the_input_device():
    pattern, mask = on_meta(2, 3, 6, 7), torch.zeros(2, 6, dtype=torch.bool, device=META)
    results = [stats.first_token_mass(pattern, 1), stats.slot_mass(pattern, 1), stats.sink_alpha(pattern, 1),
               stats.key_mass(pattern, 1), stats.sequence_medians(on_meta(2, 6, 8)),
               stats.position_norms(on_meta(2, 6, 8), 1), *stats.bb_masses(pattern, mask, 1).values(),
               *stats.value_norms(on_meta(2, 3, 6, 4), on_meta(12, 12))]
    assert all(r.device == META for r in results)


@pytest.mark.parametrize("options", [{}, {"sink": "kv_bias"}, {"n_sink_tokens": 2}])
def test_the_collect_reducer_keeps_every_layer_figure_on_the_device(options):
    """What collect() keeps per hook point is computed on the model's device; it reads them all at the end."""
    model = tiny(**options).to(META)
    P, slots = 8 + model.n_prefix, model.n_slot_columns
    reduce = layer_reducer(model, trigger_mask=torch.zeros(2, 8, dtype=torch.bool, device=META))
    kept = [reduce("h.0.resid_post", on_meta(2, P, 32)), reduce("h.0.attn_z", on_meta(2, P, 32)),
            reduce("h.0.pattern", on_meta(2, 2, P, 8 + slots)), {"v": reduce("h.0.v", on_meta(2, 2, P, 16))}]
    leaves = []
    for figures in kept:
        for value in figures.values():
            leaves.extend(value.values() if isinstance(value, dict) else value if isinstance(value, tuple)
                          else [value])
    tensors = [t for t in leaves if t is not None]
    assert len(tensors) >= 10 and all(t.device == META for t in tensors)


def test_quantization_observers_keep_their_buffers_on_the_observed_device():
    weight, inputs = on_meta(6, 32), on_meta(4, 32)
    observer = weight_observer(8, weight.device)
    observer(weight)  # an observer built on the CPU copies the device's min/max into CPU buffers: raises on meta
    assert observer.min_val.device == observer.max_val.device == META and observer.min_val.shape == (6,)
    observer = input_observer(8, inputs.device)
    observer(inputs)
    assert observer.min_val.device == META


def test_rolling_cache_evicts_and_rotates_on_the_cache_device():
    model = tiny(pos_emb="rope").to(META)
    cache = RollingKVCache(1, keep=2, window=3, rope=(model.rope_cos, model.rope_sin))
    for _ in range(4):  # 8 positions through a cache of 5: evictions happen
        keys, values = cache.update(0, on_meta(1, 2, 2, 16), on_meta(1, 2, 2, 16))
    assert keys.device == values.device == META and keys.shape == (1, 2, 5, 16) and cache.kept == 5


# ----------------------------------------------------------------------------------------------------
# a bfloat16 model on the CPU


def test_collect_of_a_bfloat16_model_agrees_with_float32():
    from sinkgpt.measure import collect
    model = randomize(tiny(n_layer=2), seed=1).eval()
    x = torch.randint(0, 36, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = collect(model, [(x, x)])
    low = collect(model.to(torch.bfloat16), [(x, x)])
    assert isinstance(low["layers"][0]["resid_kurtosis"], float)
    for key in ("median", "first_token_mass_mean", "pos0_norm", "resid_kurtosis", "attn_max_abs"):
        for a, b in zip(reference["layers"], low["layers"]):
            assert b[key] == pytest.approx(a[key], rel=0.1, abs=0.02), key  # bf16 keeps ~3 significant digits
    assert low["loss"] == pytest.approx(reference["loss"], rel=0.02)


def test_quantization_of_a_bfloat16_model_runs_with_float32_scales():
    model = randomize(tiny(), seed=2).eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 37, (2, 16), generator=g), torch.randint(0, 37, (2, 16), generator=g))]
    reference = ptq_losses(model, data)
    low = ptq_losses(model.to(torch.bfloat16), data)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the weights come back as they were
    for key in ("loss_float", "loss_w8", "loss_w8a8", "loss_w4"):
        assert low[key] == pytest.approx(reference[key], rel=0.03), key


def test_analyze_cli_runs_a_bfloat16_model(tmp_path, capsys):
    import analyze
    from test_analyze import planted_model, save_checkpoint
    save_checkpoint(planted_model(), tmp_path / "ckpt.pt")
    text = ["--text", "abcdefgabcdefgabcdefg", "--device", "cpu"]
    results = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert analyze.main([str(tmp_path), *text, "--dtype", dtype, "--report", str(out / "r")]) == 0
        assert analyze.main(["ablate", str(tmp_path), *text, "--dtype", dtype, "--report", str(out / "a")]) == 0
        assert analyze.main(["stream", str(tmp_path), *text, "--dtype", dtype, "--window", "6", "--keep", "2",
                             "--report", str(out / "s")]) == 0
        results[dtype] = [json.loads((out / name).read_text()) for name in
                          ("r/report.json", "a/ablate.json", "s/stream.json")]
    capsys.readouterr()
    (report, ablation, stream), (report16, ablation16, stream16) = results["float32"], results["bfloat16"]
    assert report16["layers"][1]["top"][0][1:] == report["layers"][1]["top"][0][1:]  # the planted entry
    assert report16["layers"][1]["top"][0][0] == pytest.approx(report["layers"][1]["top"][0][0], rel=0.02)
    assert ablation16["loss_zero"] == pytest.approx(ablation["loss_zero"], rel=0.05)
    assert stream16["rows"][0]["loss"] == pytest.approx(stream["rows"][0]["loss"], rel=0.05)


def test_training_with_bfloat16_autocast_tracks_in_float(tmp_path, char_dataset):
    from conftest import read_metrics, run_train
    assert run_train(tmp_path / "run", char_dataset, max_iters=4, dtype="bfloat16", track_interval=2) == 0
    tracked = [e for e in read_metrics(tmp_path / "run") if "track_kurtosis" in e]
    assert [e["iter"] for e in tracked] == [0, 2, 4]
    assert all(isinstance(v, float) for e in tracked for v in e["track_kurtosis"] + e["track_grad_pos0"])


# ----------------------------------------------------------------------------------------------------
# CUDA's kernel and autocast rules, with the CPU standing in


def test_qk_norm_keeps_the_cache_in_the_autocast_dtype(monkeypatch):
    """CUDA autocast runs rms_norm in float32 (the CPU's does not): with that rule in place, the KV cache still
    holds bfloat16 keys and values, as it does without qk_norm."""
    import torch.nn.functional as F
    import model as model_module
    from model import KVCache
    monkeypatch.setattr(model_module.RMSNorm, "forward",
                        lambda self, x: F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps))
    gpt = randomize(tiny(qk_norm=True, pos_emb="rope")).eval()
    cache = KVCache(gpt.config.n_layer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        gpt(torch.arange(6)[None], cache=cache)
    keys, values = cache.buffers[0]
    assert keys.dtype == values.dtype == torch.bfloat16


def test_gqa_stays_in_the_kernel_only_where_cuda_has_one():
    from types import SimpleNamespace
    from model import gqa_in_kernel

    def cuda(dtype):
        return SimpleNamespace(is_cuda=True, dtype=dtype)
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert gqa_in_kernel(cuda(torch.bfloat16), None) and gqa_in_kernel(cuda(torch.float16), None)
    assert not gqa_in_kernel(cuda(torch.float32), None) and not gqa_in_kernel(cuda(torch.bfloat16), mask)
    assert gqa_in_kernel(torch.empty(1), mask)  # the CPU keeps enable_gqa


@pytest.mark.parametrize("sink", ["none", "kv_bias"])
def test_repeated_kv_heads_give_the_same_attention_as_the_gqa_kernel(sink, monkeypatch):
    import model as model_module
    from model import KVCache
    gpt = randomize(tiny(n_head=4, n_kv_head=2, sink=sink, pos_emb="rope")).eval()
    idx = torch.randint(0, 36, (2, 10), generator=torch.Generator().manual_seed(1))

    def run():
        cache = KVCache(gpt.config.n_layer)
        with torch.no_grad():
            first, _ = gpt(idx[:, :6], cache=cache)
            rest, _ = gpt(idx[:, 6:], cache=cache)  # 4 queries on 10 keys: the masked call
        return torch.cat([first, rest], dim=1)
    fused = run()
    monkeypatch.setattr(model_module, "gqa_in_kernel", lambda q, mask: False)  # CUDA's float32 rule
    torch.testing.assert_close(run(), fused, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# pretrained folders loaded straight into their dtype, one tensor (one shard) at a time


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, llama_dir):
    """The tiny Llama saved again in shards of about 40 kB (a dozen files and an index)."""
    import shutil
    folder, hf_model = llama_dir
    sharded = tmp_path_factory.mktemp("sharded") / "llama"
    hf_model.save_pretrained(str(sharded), max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{folder}/{name}", sharded / name)
    return str(sharded)


def test_a_sharded_folder_loads_the_same_weights_and_releases_each_shard(llama_dir, sharded_llama):
    import glob
    from sinkgpt.pretrained import from_pretrained, read_hf_weights
    assert len(glob.glob(f"{sharded_llama}/*.safetensors")) >= 4
    whole, sharded = from_pretrained(llama_dir[0]), from_pretrained(sharded_llama)
    for (name, a), b in zip(whole.state_dict().items(), sharded.state_dict().values()):
        assert torch.equal(a, b), name
    weights = read_hf_weights(sharded_llama)
    for name in weights:
        weights[name]
    assert weights.open == {}  # every shard closed once all its tensors were read


def test_a_pretrained_folder_loads_in_bfloat16_within_bfloat16_rounding_of_float32(sharded_llama):
    from sinkgpt.pretrained import from_pretrained
    reference, low = from_pretrained(sharded_llama), from_pretrained(sharded_llama, dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the loading's default dtype does not leak
    for a, b in zip(reference.parameters(), low.parameters()):
        assert torch.equal(a.bfloat16(), b)  # each weight is its float32 value rounded once
    idx = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, low_logits = reference(idx)[0], low(idx)[0].float()
    # three layers in bfloat16 (8 significant bits): logits within 5% of the largest one
    assert (low_logits - logits).abs().max() <= 0.05 * logits.abs().max()


PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from sinkgpt.pretrained import from_pretrained
def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
torch.zeros(1)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
before = rss("VmRSS:")
model = from_pretrained({folder!r}, dtype=torch.bfloat16)
print(rss("VmHWM:") - before, sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.slow
def test_loading_a_sharded_folder_in_bfloat16_peaks_at_the_model_one_shard_and_one_tensor(tmp_path):
    """Measured: the process's peak resident memory over the load. Reading every shard into memory and copying
    into a float32 model peaked at about twice the float32 size (four times the bfloat16 model); built in
    bfloat16 and read one tensor at a time, the load holds the bfloat16 model, the memory map of one shard and
    one float32 tensor, with 32 MB for the allocator's own."""
    import glob
    import subprocess
    import sys
    from transformers import GPT2Config, GPT2LMHeadModel
    from conftest import REPO
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=768, n_head=12, vocab_size=2000, n_positions=256))
    hf_model.save_pretrained(str(tmp_path / "gpt2"), max_shard_size="20MB")
    largest_tensor = max(4 * p.numel() for p in hf_model.parameters())
    del hf_model
    largest_shard = max(os.path.getsize(f) for f in glob.glob(str(tmp_path / "gpt2" / "*.safetensors")))
    script = PEAK_SCRIPT.format(repo=REPO, folder=str(tmp_path / "gpt2"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    peak, n_params = (int(v) for v in out.stdout.split())
    bound = 2 * n_params + largest_shard + largest_tensor + 32 * 2**20
    assert n_params > 40e6 and peak <= bound < 4 * n_params, (peak / 2**20, bound / 2**20, 4 * n_params / 2**20)
