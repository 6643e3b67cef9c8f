"""gpu_check.py: its figures, goals and summary from bench.py's results, and a dry run of every step on the CPU
(the GPU run itself is what the script is for)."""
import json

import pytest

import gpu_check


def test_figures_goals_and_summary_from_bench_results():
    sinks = {"device": "NVIDIA H100", "params": 124e6, "variants": [
        dict(variant="sink=none", ms_per_iter=100.0, ratio=1.0, tokens_per_s=163840.0, mfu=0.52, peak_mem_mb=9000.0),
        dict(variant="sink=logit", ms_per_iter=108.0, ratio=1.08, tokens_per_s=151703.7, mfu=0.48,
             peak_mem_mb=9100.0)]}
    gates = {"device": "NVIDIA H100", "params": 124e6, "variants": [
        dict(variant="attn_gate=none", ms_per_iter=101.0, ratio=1.0, tokens_per_s=162217.8, mfu=0.51,
             peak_mem_mb=9000.0),
        dict(variant="attn_gate=headwise", ms_per_iter=103.0, ratio=1.0198, tokens_per_s=159068.0, mfu=0.5,
             peak_mem_mb=9050.0)]}
    training = gpu_check.training_figures([sinks, gates])
    assert (training["ms_per_iter"], training["mfu"]) == (100.0, 0.52) and len(training["variants"]) == 4
    assert training["variants"]["sink=logit"] == {"ms_per_iter": 108.0, "ratio": 1.08, "tokens_per_s": 151703.7,
                                                  "mfu": 0.48, "peak_mem_mb": 9100.0}
    met = gpu_check.goals(training)
    assert met["mfu_met"] is True and met["ratio_met"] is False and met["variants_slower"] == ["sink=logit"]
    report = {"device": "NVIDIA H100", "torch": "2.13.0", "seconds": 280.0, "errors": [], "training": training,
              "goals": met, "tests": {"passed": 15, "failed": 0, "skipped": 0, "seconds": 120.0},
              "generation": {"tokens_per_s": 300.0, "decode_tokens_per_s": 320.0, "prefill_s": 0.012}}
    text = gpu_check.summary(report)
    assert "MFU 52.0%" in text and "sink=logit                   108.0   1.080      9100" in text
    assert "(slower: sink=logit)" in text and "tests/test_cuda.py: 15 passed, 0 failed" in text


def test_without_a_gpu_the_check_is_one_error_line(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: CUDA is not available") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit, match="^error: unknown argument '--bogus'"):
        gpu_check.main(["--bogus"])


@pytest.mark.slow
def test_a_dry_run_on_the_cpu_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--cpu_dry_run", f"--out={out}"]) == 0
    report = json.loads(out.read_text())
    assert report["tests"]["failed"] == 0 and report["tests"]["skipped"] >= 10  # test_cuda.py skips on a CPU
    variants = report["training"]["variants"]
    expected = [f"sink={s}" for s in ("none", "token", "logit", "softmax1", "kv_bias", "k_bias", "bos_override")]
    expected += [f"attn_gate={g}" for g in ("none", "headwise", "elementwise")] + ["attn_window=0", "attn_window=8"]
    assert list(variants) == expected
    assert variants["sink=none"]["ratio"] == 1.0 and report["training"]["mfu"] is None  # no CPU peak
    assert report["generation"]["tokens_per_s"] > 0 and report["errors"] == []
    assert "wrote" in capsys.readouterr().out


class Ended:
    """A pytest process that has ended."""

    def wait(self):
        return 0


def test_test_counts_add_up_the_shards_and_count_a_missing_report_as_a_failure(tmp_path):
    first, second = tmp_path / "a.xml", tmp_path / "b.xml"
    first.write_text('<testsuites><testsuite name="pytest" tests="5" failures="1" errors="0" skipped="1">'
                     '</testsuite></testsuites>')
    second.write_text('<testsuite name="pytest" tests="4" failures="0" errors="1" skipped="0"></testsuite>')
    counts = gpu_check.test_counts([(Ended(), str(first)), (Ended(), str(second))], 12.0)
    assert counts == {"passed": 6, "failed": 2, "skipped": 1, "seconds": 12.0}
    counts = gpu_check.test_counts([(Ended(), str(first)), (Ended(), str(tmp_path / "none.xml"))], 1.0)
    assert counts["failed"] == 2 and counts["passed"] == 3
    assert gpu_check.test_counts([], 0.0)["failed"] == 1  # nothing collected
