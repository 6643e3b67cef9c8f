"""train.py: a short run learns and writes its files; resuming is bit for bit (with dropout too); SIGTERM saves a
resumable checkpoint; a NaN stops the run and leaves the checkpoint intact; best_val_loss; bad inputs; every sink
option trains, resumes and samples."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, flags, read_metrics, run_train, train_losses, val_losses
from sinkgpt.checkpoint import model_from_checkpoint
from sinkgpt.runtime import pick_dtype


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    return lines[0]


def test_short_run_learns_and_writes_its_files(tmp_path, char_dataset):
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=60, lr_decay_iters=60, eval_interval=20) == 0
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 61))
    first, last = losses[1], losses[60]
    assert first > 3.9  # ~ln(vocab) at the start
    assert last < first - 0.7, (first, last)
    vals = val_losses(out)
    assert [it for it, _ in vals] == [0, 20, 40, 60]
    assert vals[-1][1] < vals[0][1] - 0.7

    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["max_iters"] == 60 and config["n_embd"] == 32 and config["dataset"] == char_dataset
    assert config["device_resolved"] == "cpu" and config["dtype_resolved"] == "float32"

    events = read_metrics(out)
    train_events = [e for e in events if "train_loss" in e and "ms_per_iter" in e]
    for e in train_events:
        for key in ("iter", "tokens", "lr", "train_loss", "ms_per_iter", "tokens_per_s"):
            assert key in e, key
        assert e["tokens"] == e["iter"] * 8 * 32
        assert e["ms_per_iter"] > 0 and e["tokens_per_s"] > 0
    eval_events = [e for e in events if "val_loss" in e]
    assert all("train_loss" in e and "best_val_loss" in e and "lr" in e for e in eval_events)
    # the cosine schedule: lr from learning_rate down to min_lr at lr_decay_iters
    lrs = {e["iter"]: e["lr"] for e in train_events}
    assert lrs[1] == pytest.approx(3e-3, rel=1e-2) and all(lrs[i] >= lrs[i + 1] for i in range(1, 60))

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == 60 and ckpt["tokens"] == 60 * 8 * 32
    assert ckpt["best_val_loss"] == pytest.approx(min(v for _, v in vals))
    assert ckpt["model_args"]["n_layer"] == 2 and ckpt["meta"]["tokenizer"] == "char"
    model = model_from_checkpoint(ckpt)
    assert model.config.vocab_size == ckpt["meta"]["vocab_size"]


def resume_case(tmp_path, dataset, **extra):
    """(uninterrupted run A, run B stopped at 10 and resumed to 20)."""
    common = dict(lr_decay_iters=20, eval_interval=10, log_interval=1, **extra)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(a, dataset, max_iters=20, **common) == 0
    assert run_train(b, dataset, max_iters=10, **common) == 0
    assert torch.load(b / "ckpt.pt", weights_only=True)["iter_num"] == 10
    assert run_train(b, dataset, max_iters=20, init_from="resume", **common) == 0
    return a, b


@pytest.mark.parametrize("extra", [dict(), dict(dropout=0.2), dict(gradient_accumulation_steps=2, dropout=0.1),
                                   dict(optimizer="sgd", learning_rate=0.1, prepend_bos=True)],
                         ids=["plain", "dropout", "accumulation", "sgd-prepend_bos"])
def test_resume_is_bit_for_bit(tmp_path, char_dataset, extra):
    a, b = resume_case(tmp_path, char_dataset, **extra)
    la, lb = train_losses(a), train_losses(b)
    assert sorted(lb) == list(range(1, 21))  # the log of B has every iteration once
    for it in range(11, 21):
        assert la[it] == lb[it], (it, la[it], lb[it])
    assert val_losses(a) == val_losses(b)
    ckpt_a = torch.load(a / "ckpt.pt", weights_only=True)
    ckpt_b = torch.load(b / "ckpt.pt", weights_only=True)
    for name, tensor in ckpt_a["model"].items():
        assert torch.equal(tensor, ckpt_b["model"][name]), name
    assert ckpt_a["tokens"] == ckpt_b["tokens"] and ckpt_a["best_val_loss"] == ckpt_b["best_val_loss"]


def test_dropout_is_really_random_in_training(tmp_path, char_dataset):
    """Dropout draws from the RNG during training (so the dropout case above tests the restored RNG state)."""
    assert run_train(tmp_path / "p", char_dataset, max_iters=3, eval_interval=3) == 0
    assert run_train(tmp_path / "d", char_dataset, max_iters=3, eval_interval=3, dropout=0.2) == 0
    assert train_losses(tmp_path / "p")[3] != train_losses(tmp_path / "d")[3]


def start_train_process(out, dataset, **overrides):
    # one thread, as in this process (conftest): the resumed run is compared bit for bit with an in-process run
    env = dict(os.environ, SINKGPT_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    argv = [sys.executable, os.path.join(REPO, "train.py")] + flags(out_dir=str(out), dataset=dataset, **overrides)
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_iter(proc, out, at_least, limit_s=120):
    """Poll metrics.jsonl until an iteration >= at_least is logged (the limit only guards a hang)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (out / "metrics.jsonl").exists():
            with open(out / "metrics.jsonl") as f:
                complete = [line for line in f.read().split("\n")[:-1] if line.strip()]  # lines being written: no
            done = [e["iter"] for e in map(json.loads, complete) if "ms_per_iter" in e]
            if done and max(done) >= at_least:
                return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the training process logged no progress")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path, char_dataset):
    out = tmp_path / "run"
    common = dict(lr_decay_iters=400, eval_interval=1000, log_interval=1)
    proc = start_train_process(out, char_dataset, max_iters=100000, **common)
    wait_for_iter(proc, out, 5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "SIGTERM" in stdout and "Traceback" not in stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    stopped = ckpt["iter_num"]
    assert stopped >= 5
    # the log holds each iteration up to the stop once
    assert sorted(train_losses(out)) == list(range(1, stopped + 1))
    # resume for 5 more iterations: equal to a run that was never interrupted
    assert run_train(out, char_dataset, init_from="resume", max_iters=stopped + 5, **common) == 0
    ref = tmp_path / "ref"
    assert run_train(ref, char_dataset, max_iters=stopped + 5, **common) == 0
    resumed, uninterrupted = train_losses(out), train_losses(ref)
    assert sorted(resumed) == list(range(1, stopped + 6))
    for it in range(stopped + 1, stopped + 6):
        assert resumed[it] == uninterrupted[it], it
    assert val_losses(out)[-1] == val_losses(ref)[-1]


def sigterm_in_iteration(monkeypatch, n):
    """SIGTERM raised from inside the n-th training iteration (its gradient clipping); returns what ends it."""
    calls = {"n": 0}
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_and_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            signal.raise_signal(signal.SIGTERM)
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_signal)
    return lambda: monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)


def test_stop_signal_in_process_saves_and_returns_130(tmp_path, char_dataset, monkeypatch):
    """The same path as SIGTERM, in-process: the handler is called during the 4th iteration."""
    import train
    end_signal = sigterm_in_iteration(monkeypatch, 4)
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=1000, eval_interval=1000) == 130
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 4
    end_signal()
    assert run_train(out, char_dataset, max_iters=8, eval_interval=1000, init_from="resume") == 0
    assert train.load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 8


def test_stop_signal_keeps_the_best_checkpoint_when_only_improvements_are_saved(tmp_path, char_dataset,
                                                                                   monkeypatch):
    import train
    end_signal = sigterm_in_iteration(monkeypatch, 6)
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=1000, eval_interval=4, always_save_checkpoint=False) == 130
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 4  # the last improvement, untouched
    assert torch.load(out / "ckpt_stop.pt", weights_only=True)["iter_num"] == 6
    end_signal()
    assert run_train(out, char_dataset, max_iters=8, eval_interval=4, always_save_checkpoint=False,
                     init_from="resume", resume_from=str(out / "ckpt_stop.pt")) == 0
    assert max(e["iter"] for e in read_metrics(out)) == 8
    assert train.load_checkpoint(str(out / "ckpt_stop.pt"))["iter_num"] == 6


def test_ctrl_c_before_training_starts_is_one_line_and_code_130(tmp_path, char_dataset, capsys, monkeypatch):
    import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "build_model", interrupted)
    assert run_train(tmp_path / "run", char_dataset, max_iters=2) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_resuming_past_a_lowered_max_iters_stops_at_once(trained_run, char_dataset, capsys):
    files = ("ckpt.pt", "metrics.jsonl")
    before = {name: sha256(trained_run / name) for name in files}
    capsys.readouterr()
    assert run_train(trained_run, char_dataset, init_from="resume", max_iters=2) == 0  # checkpoint at 4
    assert "nothing to train" in capsys.readouterr().out
    assert {name: sha256(trained_run / name) for name in files} == before


def test_fresh_run_refuses_to_overwrite_a_run(trained_run, char_dataset, capsys):
    before = sha256(trained_run / "ckpt.pt")
    capsys.readouterr()
    assert run_train(trained_run, char_dataset, max_iters=8) == 1
    assert "--init_from=resume" in one_error_line(capsys)
    assert sha256(trained_run / "ckpt.pt") == before


@pytest.mark.parametrize("held", ["ckpt_stop.pt", "ckpt_100.pt"], ids=["stop", "kept"])
def test_fresh_run_refuses_a_folder_holding_only_a_stop_or_kept_checkpoint(tmp_path, char_dataset, capsys, held):
    out = tmp_path / "run"
    os.makedirs(out)
    (out / held).write_bytes(b"an earlier run")
    assert run_train(out, char_dataset, max_iters=2) == 1
    assert held in one_error_line(capsys)
    assert (out / held).read_bytes() == b"an earlier run" and not (out / "metrics.jsonl").exists()


def same_content(a, b):
    """Nested dicts / lists / tensors equal exactly (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_content(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_content, a, b))
    return a == b


def same_checkpoint(path_a, path_b):
    """Two checkpoints hold the same training state (the config differs in out_dir)."""
    a, b = (torch.load(p, weights_only=True) for p in (path_a, path_b))
    return all(same_content(a[key], b[key]) for key in a if key != "config")


def test_keep_checkpoints_keeps_every_nth_step_as_ckpt_pt_held_it(tmp_path, char_dataset):
    import train
    keep, plain = tmp_path / "keep", tmp_path / "plain"
    common = dict(eval_interval=4, lr_decay_iters=10)  # the same schedule whatever max_iters
    assert run_train(keep, char_dataset, max_iters=10, keep_checkpoints=4, **common) == 0
    assert sorted(os.listdir(keep)) == ["ckpt.pt", "ckpt_0.pt", "ckpt_4.pt", "ckpt_8.pt", "config.json",
                                        "metrics.jsonl"]
    assert [train.load_checkpoint(str(keep / f"ckpt_{it}.pt"))["iter_num"] for it in (0, 4, 8)] == [0, 4, 8]
    # the same run without keeping: its ckpt.pt at steps 4 and 8 is the kept copy, bit for bit (keeping a copy
    # draws nothing from the random state), and its last one is the keeping run's ckpt.pt
    for step in (4, 8):
        assert run_train(plain / str(step), char_dataset, max_iters=step, **common) == 0
        assert same_checkpoint(keep / f"ckpt_{step}.pt", plain / str(step) / "ckpt.pt"), step
    assert run_train(plain / "10", char_dataset, max_iters=10, **common) == 0
    assert same_checkpoint(keep / "ckpt.pt", plain / "10" / "ckpt.pt")
    assert not same_checkpoint(keep / "ckpt_4.pt", keep / "ckpt_8.pt")  # the comparison can fail
    # a kept checkpoint resumes: from step 4 to 8 it reaches the kept step 8
    assert run_train(tmp_path / "from4", char_dataset, max_iters=8, init_from="resume",
                     resume_from=str(keep / "ckpt_4.pt"), **common) == 0
    assert same_checkpoint(keep / "ckpt_8.pt", tmp_path / "from4" / "ckpt.pt")


def test_keep_checkpoints_on_resume_keeps_the_later_steps_only(tmp_path, char_dataset):
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=4, eval_interval=2, keep_checkpoints=2) == 0
    before = sha256(out / "ckpt_4.pt")
    assert run_train(out, char_dataset, max_iters=6, eval_interval=2, keep_checkpoints=3, init_from="resume") == 0
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == ["ckpt_0.pt", "ckpt_2.pt", "ckpt_4.pt",
                                                                         "ckpt_6.pt"]
    assert sha256(out / "ckpt_4.pt") == before  # the resume point is not rewritten


def test_keep_checkpoints_below_zero_is_one_clear_error(tmp_path, char_dataset, capsys):
    assert run_train(tmp_path / "run", char_dataset, max_iters=2, keep_checkpoints=-1) == 1
    assert "keep_checkpoints" in one_error_line(capsys)


def test_fresh_run_starts_a_new_metrics_log(tmp_path, char_dataset):
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "metrics.jsonl").write_text('{"iter": 99, "train_loss": 1.0}\n')  # a run that died before a checkpoint
    assert run_train(out, char_dataset, max_iters=2, eval_interval=2) == 0
    assert all(e["iter"] <= 2 for e in read_metrics(out))


def test_out_dir_that_is_a_file_is_one_clear_error(tmp_path, char_dataset, capsys):
    (tmp_path / "afile").write_text("x")
    assert run_train(tmp_path / "afile", char_dataset, max_iters=2) == 1
    assert "out_dir" in one_error_line(capsys)


def test_resume_skips_a_metrics_line_cut_off_by_a_kill(trained_run, char_dataset):
    with open(trained_run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 5, "tok')
    assert run_train(trained_run, char_dataset, init_from="resume", max_iters=6) == 0
    assert [e["iter"] for e in read_metrics(trained_run) if "val_loss" in e] == [0, 2, 4, 6]


def test_resume_from_without_init_from_resume_is_an_error(tmp_path, trained_run, char_dataset, capsys):
    assert run_train(tmp_path / "new", char_dataset, max_iters=2, resume_from=str(trained_run)) == 1
    assert "'resume_from'" in one_error_line(capsys)


def test_block_size_longer_than_the_data_is_one_clear_error(tmp_path, char_dataset, capsys):
    assert run_train(tmp_path / "run", char_dataset, max_iters=2, block_size=10**7) == 1
    assert "block_size" in one_error_line(capsys)


def test_resume_on_another_kind_of_dataset_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "bb"  # Bigram-Backcopy's vocabulary is the bundled char set + BOS: 85, as shakespeare_char
    assert run_train(out, "bigram_backcopy", max_iters=2, eval_interval=2) == 0
    capsys.readouterr()
    assert run_train(out, "shakespeare_char", init_from="resume", max_iters=4) == 1
    assert "dataset" in one_error_line(capsys)


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, char_dataset, capsys):
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=10, lr_decay_iters=10) == 0
    before = sha256(out / "ckpt.pt")
    capsys.readouterr()
    code = run_train(out, char_dataset, init_from="resume", max_iters=60, lr_decay_iters=60,
                     learning_rate=1e6, min_lr=1e6, grad_clip=0.0)
    assert code == 1
    line = one_error_line(capsys)
    assert "nan" in line.lower() or "inf" in line.lower()
    assert sha256(out / "ckpt.pt") == before
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 10
    # the untouched checkpoint still resumes
    assert run_train(out, char_dataset, init_from="resume", max_iters=12, lr_decay_iters=12) == 0


def test_nan_at_evaluation_keeps_the_checkpoint(tmp_path, char_dataset, capsys, monkeypatch):
    import train
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=10) == 0
    before = sha256(out / "ckpt.pt")
    real = train.evaluate

    def evaluate_nan(*args, **kwargs):
        losses = real(*args, **kwargs)
        return dict(losses, val_loss=float("nan"))

    monkeypatch.setattr(train, "evaluate", evaluate_nan)
    capsys.readouterr()
    assert run_train(out, char_dataset, init_from="resume", max_iters=20) == 1
    line = one_error_line(capsys)
    assert "nan" in line and "checkpoint in" in line and "untouched" in line
    assert sha256(out / "ckpt.pt") == before
    # NaN before any checkpoint: the message does not promise one
    assert run_train(tmp_path / "fresh", char_dataset, max_iters=20) == 1
    assert "no checkpoint was written" in one_error_line(capsys)


def test_best_val_loss_is_the_minimum_seen(tmp_path, char_dataset, monkeypatch):
    import train
    scripted = {0: 3.0, 10: 2.0, 20: 2.5, 30: 2.8}
    real = train.evaluate
    seen = []

    def evaluate_scripted(*args, **kwargs):
        losses = real(*args, **kwargs)
        it = len(seen) * 10
        seen.append(it)
        return dict(losses, val_loss=scripted[it])

    monkeypatch.setattr(train, "evaluate", evaluate_scripted)
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=30, eval_interval=10, always_save_checkpoint=False) == 0
    events = [e for e in read_metrics(out) if "val_loss" in e]
    assert [(e["iter"], e["val_loss"], e["best_val_loss"]) for e in events] == \
        [(0, 3.0, 3.0), (10, 2.0, 2.0), (20, 2.5, 2.0), (30, 2.8, 2.0)]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["best_val_loss"] == 2.0
    assert ckpt["iter_num"] == 10  # always_save_checkpoint=False: only the improving evaluation saved
    # with always_save_checkpoint the last one is saved, still with the minimum as best_val_loss
    seen.clear()
    out2 = tmp_path / "run2"
    assert run_train(out2, char_dataset, max_iters=30, eval_interval=10) == 0
    ckpt = torch.load(out2 / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 30 and ckpt["best_val_loss"] == 2.0


@pytest.fixture
def trained_run(tmp_path, char_dataset):
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=4, eval_interval=2) == 0
    return out


def test_truncated_checkpoint_is_one_clear_error(trained_run, char_dataset, capsys):
    path = trained_run / "ckpt.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert run_train(trained_run, char_dataset, init_from="resume", max_iters=8) == 1
    line = one_error_line(capsys)
    assert "ckpt.pt" in line and "unreadable" in line


def test_corrupted_checkpoint_is_one_clear_error(trained_run, char_dataset, capsys):
    (trained_run / "ckpt.pt").write_bytes(b"this is not a checkpoint" * 100)
    capsys.readouterr()
    assert run_train(trained_run, char_dataset, init_from="resume", max_iters=8) == 1
    assert "ckpt.pt" in one_error_line(capsys)


def test_missing_checkpoint_is_one_clear_error(tmp_path, char_dataset, capsys):
    assert run_train(tmp_path / "nothing", char_dataset, init_from="resume", max_iters=8) == 1
    assert "no checkpoint" in one_error_line(capsys)


@pytest.mark.parametrize("key,value", [("n_layer", 3), ("n_embd", 64), ("sink", "logit"), ("bias", False)])
def test_resume_with_different_model_settings_names_the_key(trained_run, char_dataset, capsys, key, value):
    before = sha256(trained_run / "ckpt.pt")
    capsys.readouterr()
    assert run_train(trained_run, char_dataset, init_from="resume", max_iters=8, **{key: value}) == 1
    line = one_error_line(capsys)
    assert f"'{key}'" in line
    assert sha256(trained_run / "ckpt.pt") == before


def test_resume_with_another_vocabulary_is_an_error(trained_run, other_char_dataset, capsys):
    assert run_train(trained_run, other_char_dataset, init_from="resume", max_iters=8) == 1
    line = one_error_line(capsys)  # a smaller vocabulary fits the model's ids, but the characters differ
    assert "tokenized with a character vocabulary of" in line and "but the checkpoint uses a character" in line


def test_eval_only_after_resume_evaluates_once_and_leaves_the_checkpoint(trained_run, char_dataset, capsys):
    files = ("ckpt.pt", "metrics.jsonl", "config.json")
    before = {name: sha256(trained_run / name) for name in files}
    capsys.readouterr()
    # resumed at iter 4, below max_iters: the one evaluation must still happen, and the run folder is left as it is
    assert run_train(trained_run, char_dataset, init_from="resume", max_iters=8, eval_only=True,
                     eval_iters=3) == 0
    assert "step 4: train loss" in capsys.readouterr().out
    assert {name: sha256(trained_run / name) for name in files} == before


@pytest.mark.parametrize("device,words", [("foo", "not a device name"), ("cuda", "CUDA is not available"),
                                          ("xla", "not supported")])
def test_unusable_device_is_one_clear_error(tmp_path, char_dataset, capsys, monkeypatch, device, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert run_train(tmp_path / "run", char_dataset, max_iters=2, device=device) == 1
    assert words in one_error_line(capsys)


def test_bigram_backcopy_trigger_count_out_of_range_is_one_clear_error(tmp_path, capsys):
    assert run_train(tmp_path / "run", "bigram_backcopy", max_iters=2, bb_triggers=0) == 1
    assert "'bb_triggers'" in one_error_line(capsys)


def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
    assert run_train(tmp_path / "run", str(tmp_path / "no_such_dataset"), max_iters=2) == 1
    line = one_error_line(capsys)
    assert "no_such_dataset" in line


def test_checkpoint_state_dict_does_not_match_its_config(trained_run, char_dataset, capsys):
    ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
    del ckpt["model"]["transformer.h.0.attn.c_attn.weight"]
    torch.save(ckpt, trained_run / "ckpt.pt")
    capsys.readouterr()
    assert run_train(trained_run, char_dataset, init_from="resume", max_iters=8) == 1
    assert "c_attn" in one_error_line(capsys)


def test_init_from_a_gpt2_directory_with_a_char_dataset_is_an_error(tmp_path, char_dataset, capsys):
    from conftest import random_gpt2
    random_gpt2(seed=1, vocab_size=50257, n_layer=2, n_head=2, n_embd=32).save_pretrained(str(tmp_path / "gpt2"))
    capsys.readouterr()
    assert run_train(tmp_path / "run", char_dataset, init_from=str(tmp_path / "gpt2"), max_iters=2) == 1
    line = one_error_line(capsys)
    assert "tokenized with a character vocabulary" in line and "uses GPT-2 BPE; use a GPT-2 BPE dataset" in line
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_init_from_a_folder_whose_vocabulary_cannot_hold_its_tokenizer_is_an_error(tmp_path, char_dataset, hf_dir,
                                                                                     capsys):
    """A GPT-2 folder of vocabulary 100 and no tokenizer.json would be read with GPT-2 BPE (50257 ids)."""
    assert run_train(tmp_path / "run", char_dataset, init_from=hf_dir, max_iters=2, n_head=4, n_embd=64) == 1
    line = one_error_line(capsys)
    assert "vocabulary (100 tokens)" in line and "tokenizer.json" in line


def test_init_from_refuses_a_config_that_changes_the_pretrained_architecture(tmp_path, char_dataset, hf_dir, capsys):
    assert run_train(tmp_path / "run", char_dataset, init_from=hf_dir, max_iters=2, n_head=2) == 1
    line = one_error_line(capsys)
    assert "'n_head'=2 differs from" in line and "keeps its architecture" in line



def test_a_key_named_on_resume_is_refused_even_at_its_default(tmp_path, char_dataset, capsys):
    """--sink=none on a sink=logit checkpoint names the default value, which is still not the checkpoint's."""
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=2, sink="logit") == 0
    capsys.readouterr()
    assert run_train(out, char_dataset, max_iters=4, init_from="resume", sink="none") == 1
    line = one_error_line(capsys)
    assert "'sink'='none' differs from the checkpoint's 'logit'" in line
    assert run_train(out, char_dataset, max_iters=4, init_from="resume") == 0  # left out: the checkpoint's


def test_dropout_named_on_resume_is_the_resumed_model_s(tmp_path, char_dataset):
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=2) == 0  # TINY flags: dropout 0.0
    assert run_train(out, char_dataset, max_iters=4, init_from="resume", dropout=0.25) == 0
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_args"]["dropout"] == 0.25


def test_a_key_named_on_a_pretrained_start_is_refused_even_at_its_default(tmp_path, char_dataset, llama_dir,
                                                                            capsys):
    """A Llama folder has RMSNorm: naming the default norm='layernorm' is refused, not silently dropped."""
    folder, _ = llama_dir
    assert run_train(tmp_path / "run", char_dataset, init_from=folder, max_iters=2, n_layer=3, n_head=6, n_embd=48,
                     norm="layernorm") == 1
    line = one_error_line(capsys)
    assert "'norm'='layernorm' differs from" in line and "'rmsnorm'" in line

# ------------------------------------------------------------------------------------------------
# every sink option: trains, resumes exactly, samples

SINK_OPTIONS = [dict(sink="token"), dict(sink="token", n_sink_tokens=2), dict(sink="logit"), dict(sink="softmax1"),
                dict(sink="kv_bias"), dict(sink="k_bias"), dict(sink="bos_override", prepend_bos=True),
                dict(attn_gate="headwise"), dict(attn_gate="elementwise"), dict(attn_fn="sigmoid"),
                dict(attn_fn="relu"), dict(pos_emb="rope", sink="kv_bias", qk_norm=True)]
# the ablation flags and optimizers go through the same life cycle
SINK_OPTIONS += [dict(pos_emb="rope"), dict(pos_emb="none"), dict(norm="rmsnorm"), dict(norm_pos="post"),
                 dict(qk_norm=True), dict(mlp_act="relu"), dict(mlp_act="relu2"), dict(mlp_act="swiglu"),
                 dict(bias=False), dict(tie_embeddings=False), dict(logit_softcap=30.0), dict(optimizer="muon"),
                 dict(optimizer="sgd", learning_rate=0.1), dict(optimizer="muon", sink="logit", norm_pos="post")]


@pytest.mark.parametrize("options", SINK_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_sink_option_trains_resumes_and_samples(tmp_path, char_dataset, options, capsys):
    import sample
    common = dict(dict(lr_decay_iters=8, eval_interval=4, learning_rate=1e-2), **options)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(a, char_dataset, max_iters=8, **common) == 0
    assert run_train(b, char_dataset, max_iters=4, **common) == 0
    assert run_train(b, char_dataset, max_iters=8, init_from="resume", **common) == 0
    la, lb = train_losses(a), train_losses(b)
    assert [la[i] for i in range(5, 9)] == [lb[i] for i in range(5, 9)]
    assert val_losses(a) == val_losses(b)
    assert la[8] < la[1]
    ckpt = torch.load(b / "ckpt.pt", weights_only=True)
    for key, value in options.items():
        if key in ckpt["model_args"]:
            assert ckpt["model_args"][key] == value
        else:
            assert ckpt["config"][key] == value
    # the mechanism's parameters were trained (they moved from their initial values)
    names = {"token": "sink_tokens", "logit": "sink_logit", "kv_bias": "v_slot", "k_bias": "k_slot",
             "bos_override": "bos_resid"}
    sink = options.get("sink", "none")
    if sink in names:
        from model import GPT, GPTConfig
        moved = [k for k in ckpt["model"] if names[sink] in k]
        assert moved
        torch.manual_seed(1337)  # train.py's seed: the same initial weights
        init = GPT(GPTConfig.from_dict(ckpt["model_args"])).state_dict()
        assert all(not torch.equal(ckpt["model"][k], init[k]) for k in moved)
    capsys.readouterr()
    assert sample.main(["--out_dir", str(b), "--max_new_tokens=20", "--num_samples=2", "--device=cpu",
                        "--start=HAMLET:"]) == 0
    out = capsys.readouterr().out
    texts = [t for t in out.split("---------------\n") if t.strip()]
    assert len(texts) == 2
    for text in texts:
        body = text.rstrip("\n")
        start = "<|endoftext|>HAMLET:" if options.get("prepend_bos") else "HAMLET:"
        assert body.startswith(start)
        assert len(body) >= len(start) + 20 - 1  # 20 new characters (the BOS decodes to a longer marker)


# ------------------------------------------------------------------------------------------------
# checkpoints that are not sinkgpt training checkpoints; starting from GPT-2 weights


@pytest.mark.parametrize("missing", ["rng", "loader", "tokens", "model_args"])
def test_checkpoint_missing_training_state_is_one_clear_error(trained_run, char_dataset, capsys, missing):
    """E.g. a nanoGPT checkpoint (no rng, loader, tokens, meta): one line naming what is missing, exit 1."""
    ckpt = torch.load(trained_run / "ckpt.pt", weights_only=True)
    del ckpt[missing]
    torch.save(ckpt, trained_run / "ckpt.pt")
    capsys.readouterr()
    assert run_train(trained_run, char_dataset, init_from="resume", max_iters=8) == 1
    assert missing in one_error_line(capsys)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_init_from_a_gpt2_directory_builds_that_model(tmp_path, tied):
    """train.py's model for init_from=<GPT-2 folder> gives the folder's logits (the untied head included)."""
    import train
    from conftest import random_gpt2
    from sinkgpt.config import load_config
    hf = random_gpt2(seed=3, tie_word_embeddings=tied)
    hf.save_pretrained(str(tmp_path / "gpt2"))
    cfg = load_config([f"--init_from={tmp_path / 'gpt2'}", "--block_size=32", "--attn_gate=headwise"])
    model = train.build_model(cfg, vocab_size=100, bos_token=99).eval()
    assert model.config.attn_gate == "headwise"
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4  # the gate starts at 1/2 with c_proj doubled: exact


@pytest.mark.slow
def test_train_from_a_gpt2_directory_on_a_bpe_dataset(tmp_path, capsys):
    """init_from=<GPT-2 folder>: the step-0 val loss is the folder's model's loss on the same batches; then the
    run (with a sink option) trains and lowers it."""
    from sinkgpt import loader as loader_module
    from conftest import random_gpt2, shakespeare_excerpt
    from sinkgpt import prep
    text = shakespeare_excerpt(12000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(text[:6000])
    (src / "b.txt").write_text(text[6000:])
    data = str(tmp_path / "bpe")
    prep.prepare_text_dataset([str(src)], data, "gpt2", val_fraction=0.2)
    hf = random_gpt2(seed=4, vocab_size=50257, n_embd=16, n_head=2, n_layer=2, n_positions=64,
                     bos_token_id=50256, eos_token_id=50256)
    hf.save_pretrained(str(tmp_path / "gpt2"))
    out = tmp_path / "run"
    assert run_train(out, data, init_from=str(tmp_path / "gpt2"), max_iters=0, n_embd=16, block_size=32,
                     eval_iters=3) == 0
    val0 = val_losses(out)[0][1]
    val_loader = loader_module.TokenLoader(data, "val", 8, 32, seed=1337)
    losses = []
    with torch.no_grad():
        for _ in range(3):
            x, y = val_loader.next_batch()
            logits = hf(x).logits
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, 50257), y.reshape(-1)).item())
    assert val0 == pytest.approx(sum(losses) / 3, abs=1e-4)
    out2 = tmp_path / "run2"
    assert run_train(out2, data, init_from=str(tmp_path / "gpt2"), max_iters=15, eval_interval=15, n_embd=16,
                     block_size=32, eval_iters=3, sink="logit", learning_rate=1e-2, lr_decay_iters=15) == 0
    vals = val_losses(out2)
    assert vals[0][1] == pytest.approx(val0, abs=1e-2)  # the logit starts at 0 (softmax1): a small, stated cost
    assert vals[-1][1] < vals[0][1] - 0.5
    ckpt = torch.load(out2 / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["sink"] == "logit" and ckpt["model_args"]["block_size"] == 32


def test_float16_on_a_cpu_runs_and_is_recorded_as_float32(tmp_path, char_dataset):
    assert pick_dtype("float16", "cpu") == "float32" and pick_dtype("bfloat16", "cpu") == "bfloat16"
    assert pick_dtype("auto", "cpu") == "float32" and pick_dtype("float16", "cuda") == "float16"
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=2, eval_interval=2, dtype="float16") == 0
    assert json.loads((out / "config.json").read_text())["dtype_resolved"] == "float32"


# ------------------------------------------------------------------------------------------------
# live logging (wandb is optional: a stand-in module records what train.py sends it)


class FakeWandb:
    """The part of wandb's API that train.py uses: init(project, name, config) -> run; run.log(dict, step)."""

    def __init__(self):
        self.inits, self.logs = [], []

    def init(self, project, name, config):
        self.inits.append((project, name, config))
        return self

    def log(self, values, step):
        self.logs.append((step, values))


def test_wandb_log_sends_every_metrics_event_at_its_iteration(tmp_path, char_dataset, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=4, eval_interval=2, track_interval=2, wandb_log=True,
                     wandb_project="sinks") == 0
    (project, name, config), = fake.inits
    assert (project, name, config["max_iters"]) == ("sinks", "run", 4)  # the run name defaults to out_dir's
    events = read_metrics(out)
    assert [step for step, _ in fake.logs] == [e["iter"] for e in events]
    for (step, values), event in zip(fake.logs, events):
        for key in ("train_loss", "val_loss", "lr"):
            if key in event:
                assert values[key] == event[key], key
    tracked = next(values for _, values in fake.logs if "track_ratio/0" in values)  # per-layer lists: one key each
    assert "track_ratio/1" in tracked and "track_ratio" not in tracked


def test_wandb_log_off_by_default_and_without_wandb_one_error_line(tmp_path, char_dataset, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert run_train(tmp_path / "off", char_dataset, max_iters=2) == 0
    capsys.readouterr()
    assert run_train(tmp_path / "on", char_dataset, max_iters=2, wandb_log=True) == 1
    assert "pip install wandb" in one_error_line(capsys)
    assert not (tmp_path / "on" / "ckpt.pt").exists() and not (tmp_path / "on" / "config.json").exists()
