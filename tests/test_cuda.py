"""The GPU path end to end, on a CUDA GPU (skipped without one): every sink option trained with torch.compile,
bfloat16 and tracking, resumed, sampled and analysed; a two-variant study; quantization and streaming against the
CPU's figures; torchrun with one process (and two where two GPUs exist); bench.py. gpu_check.py runs this file
and the GPT-2 124M benchmark in one call."""
import json
import os
import subprocess
import sys

import pytest
import torch

import analyze
import bench
import sample
import study
from conftest import read_metrics, run_train, tiny, randomize
from model import CHOICES
from sinkgpt.runtime import peak_flops, pick_device, pick_dtype

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = dict(device="cuda", dtype="bfloat16", compile=True)
OPTIONS = [{"sink": sink} for sink in CHOICES["sink"]] + [{"attn_gate": gate} for gate in CHOICES["attn_gate"][1:]]


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles its own models: dynamo's per-code-object limit (8) would turn later ones eager."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_device_rules_on_a_real_gpu():
    assert pick_device("auto") == pick_device("cuda") == "cuda:0"
    major, _ = torch.cuda.get_device_capability()
    assert pick_dtype("auto", "cuda") == ("bfloat16" if major >= 8 else "float16")
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200", "A100")):
        assert peak_flops("cuda:0") is not None


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_sink_option_trains_compiled_in_bfloat16_resumes_samples_and_analyses(tmp_path, char_dataset,
                                                                                     capsys, options):
    out = tmp_path / "run"
    train = dict(GPU, track_interval=2, eval_interval=2, dropout=0.1, lr_decay_iters=6, **options)
    assert run_train(out, char_dataset, max_iters=4, **train) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["device_resolved"], config["dtype_resolved"]) == ("cuda:0", "bfloat16")
    assert run_train(out, char_dataset, max_iters=6, init_from="resume", **train) == 0
    events = read_metrics(out)
    assert max(e["iter"] for e in events) == 6
    assert [e["iter"] for e in events if "track_kurtosis" in e] == [0, 2, 4, 6]
    assert all(e["mfu"] is None or 0 < e["mfu"] < 1 for e in events if "ms_per_iter" in e)
    capsys.readouterr()
    assert sample.main(["--out_dir", str(out), "--device=cuda", "--max_new_tokens=16", "--num_samples=1"]) == 0
    for dtype in ("float32", "bfloat16"):
        report = tmp_path / f"report_{dtype}"
        assert analyze.main([str(out), "--device", "cuda", "--dtype", dtype, "--batches", "1", "--batch_size", "4",
                             "--report", str(report)]) == 0, capsys.readouterr().err
        layers = json.loads((report / "report.json").read_text())["layers"]
        assert all(isinstance(layer["resid_kurtosis"], float) for layer in layers)
    assert analyze.main(["stream", str(out), "--device", "cuda", "--window", "8", "--keep", "0,4", "--tokens",
                         "96"]) == 0, capsys.readouterr().err


def test_a_two_variant_study_on_the_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    config = tmp_path / "gpu_study.py"
    config.write_text(
        'base = "config/bb/base.py"\n'
        'overrides = {"max_iters": 8, "eval_interval": 4, "eval_iters": 2, "track_interval": 4, "log_interval": 4,'
        ' "n_layer": 2, "n_embd": 32, "batch_size": 8, "block_size": 32, "device": "cuda", "dtype": "bfloat16",'
        ' "compile": True}\n'
        'variants = {"baseline": {}, "kv_bias": {"sink": "kv_bias"}}\n'
        'seeds = [1]\n'
        f'out_root = "{tmp_path / "runs"}"\nreport_dir = "{tmp_path / "report"}"\n'
        'probe_batches = 1\nprobe_batch_size = 4\nrepeat_n = 8\nstream_tokens = 128\n')
    assert study.main([str(config)]) == 0
    rows = json.loads((tmp_path / "report" / "results.json").read_text())["rows"]
    assert set(rows) == {"baseline", "kv_bias"} and rows["kv_bias"][0]["slot_sink_rate"] is not None


def test_quantization_and_streaming_on_the_gpu_match_the_cpu():
    from sinkgpt.quantize import ptq_losses
    from sinkgpt.streaming import stream_losses
    model = randomize(tiny(pos_emb="rope", n_head=4, n_kv_head=2), seed=4).eval()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randint(0, 37, (2, 16), generator=g), torch.randint(0, 37, (2, 16), generator=g))]
    ids = torch.randint(0, 37, (64,), generator=g)
    on_cpu = ptq_losses(model, data), stream_losses(model, ids, 2, 8)["losses"]
    gpu = model.cuda()
    on_gpu = (ptq_losses(gpu, [(x.cuda(), y.cuda()) for x, y in data]), stream_losses(gpu, ids.cuda(), 2, 8)["losses"])
    for key in ("loss_float", "loss_w8", "loss_w8a8", "loss_w4"):
        assert on_gpu[0][key] == pytest.approx(on_cpu[0][key], rel=1e-3), key  # TF32 matmuls: ~1e-3
    torch.testing.assert_close(on_gpu[1].cpu(), on_cpu[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sink", ["none", "kv_bias", "token"])
def test_a_compiled_windowed_model_runs_flex_attention_and_matches_the_cpu(sink):
    """Under torch.compile on CUDA a windowed layer takes FlexAttention's block mask (head size 16): its logits
    and gradients match the CPU's banded-mask SDPA in float32."""
    model = randomize(tiny(pos_emb="rope", n_head=2, n_embd=32, attn_window=[4, 0], block_size=64, sink=sink),
                      seed=2)
    idx = torch.randint(0, 37, (2, 64), generator=torch.Generator().manual_seed(3))
    on_cpu, _ = model(idx)
    gpu = model.cuda()
    compiled = torch.compile(gpu)
    on_gpu, _ = compiled(idx.cuda())
    torch.testing.assert_close(on_gpu.float().cpu(), on_cpu, rtol=2e-3, atol=2e-3)  # TF32 matmuls
    on_gpu.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters() if p.requires_grad)


def test_qk_norm_keeps_the_cache_in_bfloat16_under_cuda_autocast():
    from model import KVCache
    model = tiny(qk_norm=True, pos_emb="rope").cuda().eval()
    cache = KVCache(model.config.n_layer)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.arange(6, device="cuda")[None], cache=cache)
    assert cache.buffers[0][0].dtype == cache.buffers[0][1].dtype == torch.bfloat16


@pytest.mark.parametrize("nproc", [1, 2] if torch.cuda.device_count() >= 2 else [1])
def test_torchrun_on_the_gpus(tmp_path, char_dataset, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           "config/train_shakespeare_char.py", f"--dataset={char_dataset}", "--n_layer=2", "--n_head=2",
           "--n_embd=32", "--block_size=32", "--batch_size=8", "--gradient_accumulation_steps=2", "--max_iters=6",
           "--eval_interval=3", "--eval_iters=2", "--log_interval=1", "--device=cuda", "--dtype=bfloat16",
           "--compile=True", f"--out_dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["world_size"] == nproc and config["device_resolved"] == "cuda:0"
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter_num"] == 6


def test_bench_times_variants_and_generation_on_the_gpu(capsys, hf_dir):
    tiny_flags = ["--device=cuda", "--dtype=bfloat16", "--compile=True", "--n_layer=2", "--n_head=2", "--n_embd=64",
                  "--block_size=64", "--batch_size=4", "--vocab_size=50", "--steps=3", "--warmup=2", "--rounds=2"]
    capsys.readouterr()
    assert bench.main([*tiny_flags, "--compare=sink=none,logit", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [v["variant"] for v in result["variants"]] == ["sink=none", "sink=logit"]
    assert all(v["peak_mem_mb"] > 0 and v["ms_per_iter"] > 0 for v in result["variants"])
    assert bench.main(["--generate", f"--init_from={hf_dir}", "--device=cuda", "--prompt_tokens=8",
                       "--new_tokens=8", "--rounds=1", "--no_cache_steps=2", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["tokens_per_s"] > 0 and generated["no_cache_tokens_per_s"] > 0
