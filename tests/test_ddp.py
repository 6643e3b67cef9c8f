"""DDP on CPU (gloo, 2 processes through torchrun) reproduces a single process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest

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
