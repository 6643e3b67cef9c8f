"""study.py: trains every variant x seed, reports, and resumes a half-finished study instead of starting over."""
import json
import math
import os

import pytest

import study
from sinkgpt import study_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_study(tmp_path, max_iters=12):
    path = tmp_path / "tiny_study.py"
    path.write_text(
        'base = "config/bb/base.py"\n'
        f'overrides = {{"max_iters": {max_iters}, "eval_interval": 6, "eval_iters": 2, "track_interval": 6,'
        ' "log_interval": 6, "n_layer": 2, "n_embd": 32, "batch_size": 8, "block_size": 32, "device": "cpu"}\n'
        'variants = {"baseline": {}, "kv_bias": {"sink": "kv_bias"}}\n'
        'seeds = [1, 2]\n'
        f'out_root = "{tmp_path / "runs"}"\n'
        f'report_dir = "{tmp_path / "report"}"\n'
        'probe_batches = 1\nprobe_batch_size = 4\nrepeat_n = 8\nstream_tokens = 128\n')
    return str(path)


@pytest.mark.slow
def test_study_trains_reports_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    config = write_study(tmp_path)
    assert study.main([config]) == 0
    runs = tmp_path / "runs"
    for variant in ("baseline", "kv_bias"):
        for seed in (1, 2):
            assert study_runner.run_status(str(runs / variant / f"seed{seed}")) == "done"
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| baseline |" in text and "| kv_bias |" in text and "non-trigger -> BOS" in text
    assert "## Outliers, quantization and streaming" in text and "W8A8 loss change" in text
    rows = json.load(open(tmp_path / "report" / "results.json"))["rows"]
    assert rows["kv_bias"][0]["slot_sink_rate"] is not None and rows["baseline"][0]["slot_sink_rate"] is None
    for key in ("outlier_resid_kurtosis", "outlier_attn_max_abs", "delta_w8a8", "delta_w4", "stream_ppl_keep0",
                "stream_ppl_keep1"):
        assert rows["baseline"][0][key] is not None and rows["baseline"][0][key] == rows["baseline"][0][key], key
    assert os.path.getsize(tmp_path / "report" / "curves" / "compare.png") > 0

    # a finished study is not trained again; a run cut short resumes from its checkpoint
    stamps = {p: os.path.getmtime(runs / p / "ckpt.pt") for p in ("baseline/seed1", "kv_bias/seed2")}
    partial = runs / "kv_bias" / "seed1"
    metrics = [json.loads(line) for line in open(partial / "metrics.jsonl")]
    with open(partial / "metrics.jsonl", "w") as f:  # as if killed after the iteration-6 checkpoint
        f.writelines(json.dumps(e) + "\n" for e in metrics if e["iter"] <= 6)
    assert study_runner.run_status(str(partial)) == "partial"
    capsys.readouterr()
    assert study.main([config]) == 0
    out = capsys.readouterr().out
    assert "[kv_bias seed 1]" in out and "--init_from='resume'" in out
    assert "[baseline seed 1]" not in out and "[kv_bias seed 2]" not in out
    assert all(os.path.getmtime(runs / p / "ckpt.pt") == stamp for p, stamp in stamps.items())
    assert study_runner.run_status(str(partial)) == "done"


def test_study_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text('varaints = {"a": {}}\n')
    assert study.main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown study key 'varaints'" in err
    empty = tmp_path / "empty.py"
    empty.write_text("seeds = []\n")
    assert study.main([str(empty)]) == 1
    assert "at least one seed" in capsys.readouterr().err
    not_dict = tmp_path / "not_dict.py"
    not_dict.write_text('variants = {"a": "sink=logit"}\n')
    assert study.main([str(not_dict), "--dry_run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "variant 'a'" in err and "dict" in err


def test_an_analysis_device_this_machine_lacks_is_one_line_before_any_training(tmp_path, capsys):
    config = write_study(tmp_path)
    with open(config, "a") as f:
        f.write('device = "bogus"\n')
    assert study.main([config]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'bogus'" in err
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_run_status_skips_a_cut_off_metrics_line(tmp_path):
    (tmp_path / "config.json").write_text('{"max_iters": 10}')
    (tmp_path / "ckpt.pt").write_bytes(b"")
    (tmp_path / "metrics.jsonl").write_text('{"iter": 10, "val_loss": 2.0}\n{"iter": 11, "tok')
    assert study_runner.run_status(str(tmp_path)) == "done"
    (tmp_path / "metrics.jsonl").write_text('{"iter": 5, "val_loss": 2.0}\n{"iter": 10, "val_lo')
    assert study_runner.run_status(str(tmp_path)) == "partial"


def test_ctrl_c_during_a_study_is_one_line_that_says_how_to_resume(tmp_path, capsys, monkeypatch):
    config = tmp_path / "s.py"
    config.write_text('variants = {"a": {}}\n')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "train_all", interrupted)
    assert study.main([str(config)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rerun" in err and "Traceback" not in err


def test_ctrl_c_lets_the_running_training_save_before_the_study_stops(tmp_path, monkeypatch):
    """A terminal Ctrl-C reaches the study and its train.py: the study must wait while the run saves."""
    import os
    import signal
    import subprocess as sp
    import sys
    import threading
    import time
    saved = tmp_path / "saved"
    ready = tmp_path / "ready"
    child = ("import signal, sys, time, pathlib\n"
             "def stop(*_):\n"
             "    time.sleep(0.5)  # the save takes a while\n"
             f"    pathlib.Path({str(saved)!r}).write_text('ok'); sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             f"pathlib.Path({str(ready)!r}).write_text('')\n"
             "time.sleep(60)\n")
    procs = []
    real_popen = sp.Popen

    def popen(*args, **kwargs):
        procs.append(real_popen(*args, **kwargs))
        return procs[-1]

    def ctrl_c():  # what a terminal does: SIGINT to the study and to its child
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        procs[0].send_signal(signal.SIGINT)

    monkeypatch.setattr(study_runner.subprocess, "Popen", popen)
    threading.Thread(target=ctrl_c, daemon=True).start()
    assert study_runner.run_training([sys.executable, "-c", child]) == 130
    assert saved.read_text() == "ok"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the study's own handler is back


def write_llama_study(tmp_path, folder, data, runs="runs", report="report", only=None):
    """A study of a pretrained Llama-family folder as config/study/smollm2.py runs SmolLM2: continued training with
    a retrofitted sink and optimizer interventions on one down-projection row, the same entry ablated in each."""
    row = "transformer.h.1.mlp.c_proj.weight[3, :]"
    base = tmp_path / "continue.py"
    base.write_text(f'init_from = "{folder}"\ndataset = "{data}"\nprepend_bos = True\ndevice = "cpu"\n'
                    'dtype = "float32"\ncompile = False\nbatch_size = 4\nblock_size = 32\nmax_iters = 6\n'
                    'lr_decay_iters = 6\nwarmup_iters = 0\nlearning_rate = 3e-3\neval_interval = 3\neval_iters = 1\n'
                    f'log_interval = 3\ntrack_interval = 3\ntrack_params = ["{row}", "transformer.h.1.mlp.c_proj.weight[3, 5]"]\n')
    path = tmp_path / f"{runs}_study.py"
    path.write_text(
        f'base = "{base}"\n'
        'variants = {"baseline": {}, "kv_bias": {"sink": "kv_bias", "sink_lr_mult": 10.0},\n'
        f'            "zero_m": {{"moment_edits": [{{"param": "{row}", "moment": "m", "op": "zero", "every": 1}}]}},\n'
        f'            "decay": {{"param_decay": [{{"param": "{row}", "weight_decay": 50.0}}]}},\n'
        '            "muon": {"optimizer": "muon", "muon_lr": 1e-3}}\n'
        + (f'variants = {{"{only}": variants["{only}"]}}\n' if only else '') +
        'seeds = [1]\n'
        f'out_root = "{tmp_path / runs}"\nreport_dir = "{tmp_path / report}"\n'
        f'massive_entry = [1, 0, 3]\nthreads = 1\nreference = "{folder}"\n'
        'probe_batches = 1\nprobe_batch_size = 2\nprobe_block_size = 64\nrepeat_n = 8\nstream_tokens = 48\n'
        'stream_window = 8\n')
    return str(path)


@pytest.mark.slow
def test_a_pretrained_llama_study_reports_and_a_killed_run_resumes_to_the_same_weights(tmp_path, llama_dir,
                                                                                       llama_data, monkeypatch, capsys):
    """The study runner on a pretrained folder (the SmolLM2 study in miniature, seconds): every variant continues
    the folder, the report carries the ablation of the one given entry and the repeated-token probe with and
    without BOS, and a run killed after its iteration-3 checkpoint resumes to the uninterrupted run's weights."""
    import torch
    monkeypatch.chdir(REPO)
    folder, _ = llama_dir
    config = write_llama_study(tmp_path, folder, llama_data)
    assert study.main([config]) == 0
    rows = json.load(open(tmp_path / "report" / "results.json"))["rows"]
    assert list(rows) == ["start", "baseline", "kv_bias", "zero_m", "decay", "muon"]
    for name, (row,) in rows.items():
        assert row["massive_entry"] == [1, 0, 3], name
        assert row["probe_loss"] > 0 and (name == "start") == (row.get("train_minutes") is None), name
        assert row["probe_tokens"] == 32, name  # every row, the reference too, probed at the runs' context
        for key in ("ablate_delta_zero", "ablate_delta_mean", "repeat_later_max", "repeat_later_max_bos"):
            assert row[key] is not None and row[key] == row[key], (name, key)
    # the reference row is the folder itself: the runs' step-0 val loss, and a probe loss the training changed
    step0 = next(e for e in map(json.loads, open(tmp_path / "runs" / "baseline" / "seed1" / "metrics.jsonl"))
                 if "val_loss" in e)
    assert rows["start"][0]["val_loss"] == step0["val_loss"]
    assert rows["start"][0]["probe_loss"] != rows["baseline"][0]["probe_loss"]
    assert rows["kv_bias"][0]["slot_sink_rate"] is not None and rows["baseline"][0]["slot_sink_rate"] is None
    text = (tmp_path / "report" / "results.md").read_text()
    assert "## The massive activation" in text and "| zero_m |" in text and "loss change, zeroed" in text
    assert "| start |" in text and "5 runs" in text
    assert os.path.getsize(tmp_path / "report" / "curves" / "pushes.png") > 0  # the signed m / update curves
    tracked = [json.loads(line) for line in open(tmp_path / "runs" / "zero_m" / "seed1" / "metrics.jsonl")]
    tracked = [e for e in tracked if "track_ratio" in e]
    key = "transformer.h.1.mlp.c_proj.weight[3,:]"
    assert [e["iter"] for e in tracked] == [0, 3, 6]
    tracked = tracked[1:]
    assert all(e[f"opt_m_norm/{key}"] == 0.0 for e in tracked)
    assert all(isinstance(e["opt_update/transformer.h.1.mlp.c_proj.weight[3,5]"], float) for e in tracked)

    # the analysis of a finished run is cached beside it for the same checkpoint and probe settings
    loaded = study_runner.load_study(config)
    done = str(tmp_path / "runs" / "baseline" / "seed1")
    with monkeypatch.context() as m:
        m.setattr(study_runner, "analyse_target", lambda *a, **k: pytest.fail("the cached analysis was redone"))
        cached = study_runner.analyse_run(loaded, done)
    assert cached == {k: v for k, v in rows["baseline"][0].items() if k != "train_minutes"}
    calls = []
    with monkeypatch.context() as m:
        m.setattr(study_runner, "analyse_target", lambda *a, **k: calls.append(1) or {"redone": True})
        assert study_runner.analyse_run(dict(loaded, stream_window=4), done) == {"redone": True}
        os.utime(os.path.join(done, "ckpt.pt"))  # a newer checkpoint: redone too
        assert study_runner.analyse_run(loaded, done) == {"redone": True}
    assert calls == [1, 1]
    # the final analysis runs on the study's device, where the model is loaded (CPU stand-in for a GPU)
    requested = []
    with monkeypatch.context() as m:
        m.setattr(study_runner, "pick_device", lambda name: requested.append(name) or "cpu")
        assert study_runner.analyse_run(dict(loaded, device="cuda:1"), done) == cached  # a new key: redone
    assert requested == ["cuda:1"]

    # a kill after the iteration-3 checkpoint leaves config.json, metrics up to iter 3 and that checkpoint
    whole = tmp_path / "runs" / "decay" / "seed1"
    killed = tmp_path / "killed" / "decay" / "seed1"
    killed.parent.mkdir(parents=True)
    cmd = study_runner.train_command(study_runner.load_study(config), "decay", 1, resume=False)
    cmd = [c.replace(str(tmp_path / "runs"), str(tmp_path / "killed")) for c in cmd] + ["--max_iters=3"]
    assert study_runner.run_training(cmd, threads=1) == 0
    cfg = json.load(open(killed / "config.json"))
    cfg["max_iters"] = 6
    json.dump(cfg, open(killed / "config.json", "w"))
    assert study_runner.run_status(str(killed)) == "partial"
    killed_config = write_llama_study(tmp_path, folder, llama_data, "killed", "killed_report", only="decay")
    capsys.readouterr()
    assert study.main([killed_config]) == 0
    out = capsys.readouterr().out
    assert "[decay seed 1]" in out and "--init_from='resume'" in out
    assert study_runner.run_status(str(killed)) == "done"
    starts = [json.loads(line) for line in open(killed / "metrics.jsonl")]
    assert [e["iter"] for e in starts if "track_ratio" in e] == [0, 3, 6]  # a resumed run logs no second start
    a = torch.load(whole / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(killed / "ckpt.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_repository_study_config_gives_valid_train_commands(monkeypatch):
    """Each study in config/study/ loads, and every variant's train.py command is a valid config (keys, types,
    the structure of optimizer interventions): a wrong key in a long study shows here, not hours into it.
    (Parameter patterns and slices are checked against the model when each run starts.)"""
    from sinkgpt.config import load_config
    from sinkgpt.optim import check_optim_config
    monkeypatch.chdir(REPO)
    folder = os.path.join(REPO, "config", "study")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_"))  # _: included parts
    assert {"bb.py", "smollm2.py", "gpt2_small.py", "sinks_char.py"} <= set(names)
    for name in names:
        plan = study_runner.load_study(os.path.join(folder, name))
        for variant in plan["variants"]:
            cmd = study_runner.train_command(plan, variant, plan["seeds"][0], resume=False)
            cfg = load_config(cmd[2:])
            check_optim_config(cfg)
            assert cfg["out_dir"] == study_runner.run_dir(plan, variant, plan["seeds"][0]), (name, variant)


def test_spread_is_the_sample_sd_one_seed_has_none_and_missing_values_are_a_dash():
    fmt, spread = study_runner.fmt_spread, study_runner.mean_spread
    assert fmt(spread([1.25]), 2) == "1.25"
    assert fmt(spread([1.0, 3.0]), 3) == "2.000 ± 1.414"  # n - 1: |a - b| / sqrt(2), not |a - b| / 2
    assert spread([1.0, 2.0, 6.0])[1] == math.sqrt((4 + 1 + 9) / 2)
    assert fmt(spread([None, float("nan")])) == "-" and fmt(spread([2.0, None]), 1) == "2.0"
    assert study_runner.layer_ranges([3, 4, 5, 9, 11, 12]) == "3-5, 9, 11-12"


def test_a_variant_equal_to_the_baseline_is_flagged_as_null():
    row = {"val_loss": 3.88, "probe_loss": 3.9, "top1_at_max_ratio": 29576.0, "sink_rate": 73.1,
           "ablate_delta_zero": 7.81, "delta_w8a8": 0.36}
    rows = {"start": [dict(row)], "baseline": [dict(row)], "gate": [dict(row)],
            "logit": [dict(row, val_loss=3.8877)], "wd": [dict(row, delta_w8a8=0.359)]}
    assert study_runner.null_variants(rows, "baseline") == ["gate"]
    table = study_runner.summary_table({k: [dict(v[0], val_backcopy_loss=None, max_ratio=1.0, max_ratio_at=[0, 0, 0],
                                                 slot_sink_rate=None, repeat_later_max=0.1)] for k, v in rows.items()},
                                       null=["gate"])
    assert "| gate (null: equals the baseline) |" in table and "| logit |" in table


def test_only_trains_the_named_variants(tmp_path, capsys):
    config = write_study(tmp_path)
    assert study.main([config, "--dry_run", "--only", "kv_bias"]) == 0
    out = capsys.readouterr().out
    assert "kv_bias/seed1" in out and "baseline/seed1" not in out
    assert study.main([config, "--dry_run", "--only", "nope"]) == 1
    assert "'nope' is not a variant" in capsys.readouterr().err
