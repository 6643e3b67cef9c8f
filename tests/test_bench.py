"""bench.py: the training and generation benchmarks run and report what they promise (no timing is asserted:
times are the benchmark's output, never a test threshold)."""
import json

import pytest

import bench
from configurator import load_config


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
def test_generation_benchmark_reports_prefill_decode_and_first_call(capsys):
    result = bench_json(capsys, "--generate", "--device=cpu", "--rounds=1")
    assert result["prompt_tokens"] == 512 and result["new_tokens"] == 64
    assert result["params"] > 85e6  # GPT-2 124M (non-embedding count)
    assert 0 < result["prefill_s"] < result["total_s"]
    assert result["tokens_per_s"] == pytest.approx(64 / result["total_s"])
    assert result["tokens_per_s_with_first_call"] < result["tokens_per_s"]


def test_benchmarked_vocabulary_follows_the_dataset():
    def vocab(dataset, override=0):
        return bench.dataset_vocab(load_config([f"--dataset={dataset}"]), override)

    assert vocab("bigram_backcopy") == 85  # 84 characters + BOS
    assert vocab("no_such_dataset") == 50257  # unknown: GPT-2's
    assert vocab("shakespeare_char", 123) == 123  # --vocab_size wins
