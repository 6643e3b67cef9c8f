"""bench.py and sinkgpt.benchmark: the training and generation benchmarks run and report what they promise (no
timing is asserted: times are the benchmark's output, never a test threshold)."""
import json

import pytest
import torch

import bench
from sinkgpt import benchmark
from sinkgpt.config import load_config


def bench_json(capsys, *argv):
    capsys.readouterr()
    assert bench.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_training_benchmark_reports_every_field_and_compares_variants(capsys):
    tiny = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2",
            "--vocab_size=50", "--steps=2", "--warmup=1", "--rounds=2"]
    result = bench_json(capsys, *tiny)
    for key in ("ms_per_iter", "tokens_per_s", "mfu", "peak_mem_mb", "device", "params"):
        assert key in result
    assert result["ms_per_iter"] > 0 and result["mfu"] is None  # no known peak for a CPU
    assert abs(result["tokens_per_s"] - 2 * 16 / result["ms_per_iter"] * 1000) < 1e-6 * result["tokens_per_s"]
    compared = bench_json(capsys, *tiny, "--compare=sink=none,logit")
    assert [v["variant"] for v in compared["variants"]] == ["sink=none", "sink=logit"]
    assert compared["variants"][0]["ratio"] == 1.0
    assert compared["variants"][1]["params"] > compared["variants"][0]["params"]  # logit adds parameters


@pytest.mark.slow
def test_generation_benchmark_reports_prefill_and_decode(capsys):
    result = bench_json(capsys, "--generate", "--device=cpu", "--rounds=1")
    assert result["prompt_tokens"] == 512 and result["new_tokens"] == 64
    assert result["params"] > 85e6  # GPT-2 124M (non-embedding count)
    assert 0 < result["prefill_s"] < result["total_s"]
    assert result["tokens_per_s"] == pytest.approx(64 / result["total_s"])
    assert result["decode_tokens_per_s"] == pytest.approx(63 / (result["total_s"] - result["prefill_s"]))


def test_benchmarked_vocabulary_follows_the_dataset():
    def vocab(dataset, override=0):
        return benchmark.dataset_vocab(load_config([f"--dataset={dataset}"]), override)

    assert vocab("bigram_backcopy") == 85  # 84 characters + BOS
    assert vocab("no_such_dataset") == 50257  # unknown: GPT-2's
    assert vocab("shakespeare_char", 123) == 123  # --vocab_size wins


def test_profile_splits_the_step_by_op_family(capsys):
    tiny = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2",
            "--vocab_size=50", "--steps=3", "--warmup=1", "--rounds=1", "--profile"]
    profile = bench_json(capsys, *tiny)["profile"]
    families = profile["ms_by_family"]
    assert profile["steps"] == 3
    for family in ("matmul", "attention", "activation", "norm", "loss", "optimizer"):
        assert families[family] > 0, family  # each has ops in every training step
    # the families split the profiled step: the ops' self times fit in it, unattributed is the remainder
    assert sum(v for k, v in families.items() if k != "unattributed") <= profile["ms_per_step"]
    assert sum(families.values()) == pytest.approx(profile["ms_per_step"], rel=1e-6)


def test_op_family_names_the_kernel_family_and_counts_optimizer_work_as_optimizer():
    from types import SimpleNamespace

    def event(name, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent)

    assert benchmark.op_family(event("aten::mm")) == "matmul"
    assert benchmark.op_family(event("aten::mm_backward_extra")) == "other ops"  # matmul names match exactly
    assert benchmark.op_family(event("aten::_scaled_dot_product_flash_attention_for_cpu_backward")) == "attention"
    assert benchmark.op_family(event("aten::gelu_backward")) == "activation"
    assert benchmark.op_family(event("aten::native_layer_norm_backward")) == "norm"
    assert benchmark.op_family(event("aten::_log_softmax")) == "loss"
    assert benchmark.op_family(event("aten::add_")) == "other ops"
    step = event("Optimizer.step#Muon.step")
    assert benchmark.op_family(event("aten::mm", event("aten::matmul", step))) == "optimizer"  # Muon's own matmuls
    assert benchmark.op_family(event("aten::linalg_vector_norm", event("clip_grad_norm"))) == "optimizer"


@pytest.mark.parametrize("flag,words", [("--steps=abc", "--steps"), ("--steps=0", "--steps"),
                                        ("--rounds=0", "--rounds"), ("--json=maybe", "--json"),
                                        ("--compare=sink", "KEY=V1,V2"), ("--compare=nokey=1,2", "'nokey'"),
                                        ("--compare=sink=foo", "'foo'"), ("--compare=n_head=3", "n_head=3"),
                                        ("--device=foo", "not a device name")])
def test_bad_bench_flag_is_one_clear_error(capsys, flag, words):
    capsys.readouterr()
    assert bench.main(["--n_layer=1", "--n_head=2", "--n_embd=32", "--vocab_size=50", "--steps=1", flag]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err


def test_bench_flags_and_config_keys_parse_together(tmp_path):
    flags, cfg = bench.parse_args(["--json=False", "--profile"])
    assert flags["json"] is False and flags["profile"] is True
    (tmp_path / "cfg.py").write_text("n_layer = 3\nbatch_size = 5\n")
    flags, cfg = bench.parse_args(["--json=True", str(tmp_path / "cfg.py"), "--n_layer=2", "--steps=4"])
    assert flags["json"] is True and flags["steps"] == 4 and "json" not in cfg and "steps" not in cfg
    assert (cfg["n_layer"], cfg["batch_size"]) == (2, 5)  # a flag wins over the file


def test_decode_floor_times_our_step_beside_the_minimal_llama_step_which_decodes_like_ours(capsys, llama_dir):
    """--decode_floor's measuring stick is a correct decoder: on a random Llama (6 query / 2 KV heads) its logits
    match our model's and it continues a prompt with the same greedy tokens as model.generate."""
    from model import KVCache
    from sinkgpt.decode_floor import minimal_llama_decoder
    from sinkgpt.generation import decode_layout
    from sinkgpt.pretrained import from_pretrained
    folder, _ = llama_dir
    result = bench_json(capsys, f"--init_from={folder}", "--generate", "--decode_floor", "--prompt_tokens=20",
                        "--new_tokens=4", "--rounds=1")
    floor = result["decode_floor"]
    assert floor["tokens"] == 16
    for key in ("ours_ms", "minimal_step_ms", "matvecs_ms", "plain_matvecs_ms", "weight_read_ms"):
        assert floor[key] > 0, key
    assert floor["minimal_max_logit_diff"] < 1e-4
    model = from_pretrained(folder).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, 10, temperature=0)[0, 12:].tolist()
    step = minimal_llama_decoder(model)
    with torch.inference_mode(), decode_layout(model):
        cache = KVCache(model.config.n_layer)
        token = model(prompt, cache=cache, last_only=True)[0][0, -1].argmax().item()
        tokens = [token]
        for _ in range(9):
            tokens.append(step(cache, tokens[-1])[0].argmax().item())
    assert tokens == expected


def test_decode_floor_has_no_minimal_step_for_a_model_outside_the_plain_llama_family(capsys, hf_dir):
    floor = bench_json(capsys, f"--init_from={hf_dir}", "--generate", "--decode_floor", "--prompt_tokens=8",
                       "--new_tokens=2", "--rounds=1")["decode_floor"]  # a GPT-2: learned positions, LayerNorm
    assert floor["minimal_step_ms"] is None and "minimal_max_logit_diff" not in floor
    assert floor["tokens"] == 8 and floor["ours_ms"] > 0 and floor["matvecs_ms"] > 0
    assert bench.main([f"--init_from={hf_dir}", "--generate", "--decode_floor", "--prompt_tokens=8",
                       "--new_tokens=2", "--rounds=1"]) == 0
    printed = capsys.readouterr().out
    assert "decode floor, ms per token (8 tokens a round): ours " in printed and "minimal Llama step" not in printed
    assert bench.main(["--decode_floor"]) == 1  # without --generate: one error line


def test_vs_transformers_times_both_models_of_one_folder_each_with_its_peak_memory(capsys, llama_dir):
    folder, _ = llama_dir
    result = bench_json(capsys, f"--init_from={folder}", "--vs_transformers", "--device=cpu", "--batch_size=2",
                        "--block_size=16", "--steps=1", "--warmup=1", "--rounds=2")
    ours, theirs = result["variants"]
    assert (ours["variant"], theirs["variant"]) == ("ours", "transformers")
    assert len(ours["ms_rounds"]) == len(theirs["ms_rounds"]) == 2
    assert theirs["ratio"] == pytest.approx(theirs["ms_per_iter"] / ours["ms_per_iter"])
    assert ours["peak_rss_mb"] > 0 and theirs["peak_rss_mb"] > 0  # each measured in a process of its own
    assert theirs["mfu"] is None and theirs["tokens_per_s"] == pytest.approx(32 / theirs["ms_per_iter"] * 1000)


def test_compile_transformers_compiles_their_model_and_compile_still_decides_ours(llama_dir):
    folder, _ = llama_dir

    def compiled(*argv):
        flags, cfg = bench.parse_args([f"--init_from={folder}", "--vs_transformers", "--batch_size=2",
                                       "--block_size=16", *argv])
        runners = dict(benchmark.make_runners(cfg, flags, "cpu"))
        return {name: isinstance(r.step_model, torch._dynamo.eval_frame.OptimizedModule) for name, r in runners.items()}

    assert compiled() == {"ours": False, "transformers": False}  # CPU: compile='auto' is off; theirs as they run it
    assert compiled("--compile=True") == {"ours": True, "transformers": False}
    assert compiled("--compile_transformers=True") == {"ours": False, "transformers": True}
    assert bench.main(["--compile_transformers=True"]) == 1  # without --vs_transformers: one error line


def test_generation_vs_transformers_checks_the_tokens_are_the_same(capsys, llama_dir):
    folder, _ = llama_dir
    result = bench_json(capsys, f"--init_from={folder}", "--generate", "--vs_transformers", "--prompt_tokens=12",
                        "--new_tokens=6", "--rounds=2")
    ours, theirs = result["variants"]
    assert result["same_tokens"] is True
    assert result["speedup"] == pytest.approx(theirs["total_s"] / ours["total_s"])
    assert len(ours["total_s_rounds"]) == len(theirs["total_s_rounds"]) == 2


def test_no_warm_up_steps_is_allowed(capsys):
    result = bench_json(capsys, "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16",
                        "--batch_size=2", "--vocab_size=50", "--steps=1", "--rounds=1", "--warmup=0")
    assert result["ms_per_iter"] > 0


def test_each_variant_reports_what_it_holds_and_ten_compiled_variants_stay_compiled(capsys, monkeypatch):
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(config, name, 8)  # dynamo's default, put back after the test
    tiny = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2",
            "--vocab_size=50", "--steps=1", "--warmup=1", "--rounds=1"]
    result = bench_json(capsys, *tiny, "--compare=n_layer=" + ",".join(str(n) for n in range(1, 11)))
    assert getattr(config, name) >= 80  # 10 models' forwards: more compiled entries per code object than 8
    assert [v["peak_mem_mb"] for v in result["variants"]] == [None] * 10  # a CPU process has one peak only
    flags, cfg = bench.parse_args(tiny)
    (_, runner), = benchmark.make_runners(cfg, flags, "cpu")
    runner.step()
    params = sum(p.numel() for p in runner.model.parameters())
    # float32 parameters, AdamW's two moments and its step counts, and two (2, 16) int64 batches
    expected = 4 * 3 * params + 4 * len(runner.optimizer.state) + 2 * 2 * 16 * 8
    assert runner.resident_mb() == pytest.approx(expected / 2**20)


def test_generation_runs_in_the_precision_sample_py_uses(capsys, monkeypatch, hf_dir):
    seen = []
    real = benchmark.OurGenerator.__call__

    def recording(self, prompt, n_new):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, prompt, n_new)
    monkeypatch.setattr(benchmark.OurGenerator, "__call__", recording)
    result = bench_json(capsys, "--generate", f"--init_from={hf_dir}", "--device=cpu", "--dtype=bfloat16",
                        "--prompt_tokens=8", "--new_tokens=4", "--rounds=1", "--no_cache_steps=2")
    assert seen and all(entry == (True, torch.bfloat16) for entry in seen)
    assert result["no_cache_tokens_per_s"] > 0


def test_streaming_time_waits_for_the_device(monkeypatch):
    from conftest import tiny
    from sinkgpt import streaming
    waited = []
    monkeypatch.setattr(streaming, "synchronize", lambda device: waited.append(str(device)))
    streaming.stream_losses(tiny(pos_emb="rope").eval(), torch.arange(20) % 30, keep=2, window=6)
    assert waited == ["cpu", "cpu"]  # before the clock starts and before it stops
