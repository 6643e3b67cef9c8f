"""DDP on CPU (gloo, 2 processes through torchrun) reproduces a single process with the same global batch."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["config/train_shakespeare_char.py", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32",
          "--max_iters=6", "--log_interval=1", "--eval_interval=3", "--eval_iters=2", "--warmup_iters=2",
          "--learning_rate=3e-3", "--device=cpu", "--dtype=float32", "--compile=False"]  # CPU figures on any machine


def run(cmd, out_dir, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd + COMMON + list(flags) + [f"--out_dir={out_dir}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    # torchrun's failure summary alone is ~2500 characters: keep enough to show the failing rank's own output
    assert result.returncode == 0, result.stderr[-10000:]
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(events, key):
    return {e["iter"]: e[key] for e in events if key in e}


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    ddp = run(torchrun, str(tmp_path / "ddp"), "--batch_size=4", "--gradient_accumulation_steps=2")
    single = run([sys.executable, "train.py"], str(tmp_path / "single"), "--batch_size=8")
    for key in ("train_loss", "val_loss"):
        ddp_losses, single_losses = losses(ddp, key), losses(single, key)
        assert sorted(ddp_losses) == sorted(single_losses) and len(ddp_losses) >= 3
        for it in ddp_losses:
            assert abs(ddp_losses[it] - single_losses[it]) <= 1e-5, (key, it, ddp_losses[it], single_losses[it])
    config = json.load(open(tmp_path / "ddp" / "config.json"))
    assert config["world_size"] == 2
    # the run resumes under DDP from its checkpoint
    resumed = run(torchrun, str(tmp_path / "ddp"), "--batch_size=4", "--gradient_accumulation_steps=2",
                  "--init_from=resume", "--max_iters=8")
    assert max(losses(resumed, "train_loss")) == 8


def torchrun_cmd(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]


@pytest.mark.slow
def test_ddp_resume_with_dropout_is_bit_for_bit(tmp_path):
    """Each rank draws its own dropout masks (seed + rank) and the checkpoint keeps every rank's RNG state."""
    ddp = ["--batch_size=4", "--gradient_accumulation_steps=2", "--dropout=0.2", "--lr_decay_iters=6"]
    straight = run(torchrun_cmd(), str(tmp_path / "straight"), *ddp)
    run(torchrun_cmd(), str(tmp_path / "resumed"), *ddp, "--max_iters=3")
    resumed = run(torchrun_cmd(), str(tmp_path / "resumed"), *ddp, "--max_iters=6", "--init_from=resume")
    assert losses(resumed, "train_loss") == losses(straight, "train_loss")
    checkpoint = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    ranks = checkpoint["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def worker_pid(launcher_pid, rank):
    """The pid of torchrun's worker process with RANK=rank."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in env:
            return int(entry)
    return None


def logged_iterations(out):
    path = out / "metrics.jsonl"
    return path.read_text().count("ms_per_iter") if path.exists() else 0


@pytest.mark.slow
def test_ddp_ranks_agree_on_a_stop_that_reaches_one_of_them(tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop at the same iteration and rank 0 saves the checkpoint."""
    out = tmp_path / "run"
    cmd = torchrun_cmd() + COMMON + ["--gradient_accumulation_steps=2", "--max_iters=100000",
                                     "--eval_interval=100000", "--ddp_timeout=60", f"--out_dir={out}"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and launcher.poll() is None and logged_iterations(out) < 3:
            time.sleep(0.2)
        os.kill(worker_pid(launcher.pid, 1), signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert "a signal to another process at iter" in stdout, stderr[-5000:]
    stopped_at = int(stdout.split("a signal to another process at iter ")[1].split(":")[0])
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == stopped_at
