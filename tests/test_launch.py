"""The GPU launch rules without a GPU: the device each torchrun process takes, the dtype, the MFU peak and the
accumulation count, with torch.cuda's answers and torchrun's environment monkeypatched; the collectives on two
gloo processes."""
import itertools

import pytest
import torch
import torch.multiprocessing as mp

from sinkgpt.common import RunError
from sinkgpt.config import ConfigError, load_config
from sinkgpt.runtime import (PEAK_FLOPS, all_reduce_mean, any_rank, peak_flops_of, pick_device, pick_dtype,
                             wrap_ddp)
from sinkgpt.training import Throughput, micro_steps_per_rank


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n, bf16_native=True): torch.cuda reports n GPUs (without CUDA_VISIBLE_DEVICES unless set)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def fake(n, bf16_native=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
        # emulated bf16 (V100, T4): supported only when emulation counts
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: bf16_native or including_emulation)
    return fake


def test_each_torchrun_process_takes_its_local_gpu(gpus):
    gpus(8)
    assert [pick_device("cuda", rank, 8) for rank in (0, 3, 7)] == ["cuda:0", "cuda:3", "cuda:7"]
    assert pick_device("auto", 5, 8) == "cuda:5" and pick_device("cuda:2") == "cuda:2"


def test_a_process_bound_to_one_gpu_takes_cuda_0(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # SLURM-style: rank 5 sees only its own GPU
    assert pick_device("cuda", 5, 8) == "cuda:0"


@pytest.mark.parametrize("requested,local_rank,n_gpus,message", [
    ("cuda", 1, 1, "torchrun started 4 processes on this node, but it has 1 GPU(s): use --nproc_per_node=1"),
    ("cuda", 0, 2, "torchrun started 4 processes on this node, but it has 2 GPU(s): use --nproc_per_node=2"),
    ("cuda:1", 0, 4, "would put all 4 processes on one GPU: use --device=cuda"),
    ("cuda", 0, 0, "CUDA is not available on this machine (use --device=cpu or auto)"),
])
def test_launch_mistakes_are_one_line_errors(gpus, requested, local_rank, n_gpus, message):
    gpus(n_gpus)
    with pytest.raises(RunError) as info:
        pick_device(requested, local_rank, 4)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_auto_dtype_takes_bfloat16_only_where_it_is_native(gpus):
    gpus(1, bf16_native=True)
    assert pick_dtype("auto", "cuda") == "bfloat16"
    gpus(1, bf16_native=False)
    assert pick_dtype("auto", "cuda") == "float16" and pick_dtype("float16", "cuda") == "float16"
    with pytest.raises(RunError, match="V100-SXM2-16GB only emulates it: use --dtype=float16"):
        pick_dtype("bfloat16", "cuda")


@pytest.mark.parametrize("name,key", [
    ("NVIDIA L40", "L40"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA H200", "H200"), ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10G", "A10G"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("Tesla V100-SXM2-32GB", "V100")])
def test_gpu_names_match_their_own_peak(name, key):
    assert peak_flops_of(name) == PEAK_FLOPS[key]


def test_unknown_gpus_have_no_peak():
    assert peak_flops_of("NVIDIA GeForce GTX 1080") is None


def test_mfu_is_per_device(monkeypatch):
    clock = itertools.count(0.0, 2.0)  # every reading 2 s after the last: each lap below times 2 s
    monkeypatch.setattr("sinkgpt.training.time.perf_counter", lambda: next(clock))

    def lap(meter):
        meter.tick()
        return meter.lap()
    _, tokens_one, mfu_one = lap(Throughput(1000, 1e12, 1e12))
    _, tokens_eight, mfu_eight = lap(Throughput(8000, 8e12, 1e12, world_size=8))  # 8 GPUs, 8 x the work
    assert mfu_one == mfu_eight == pytest.approx(0.5) and tokens_eight == 8 * tokens_one


@pytest.mark.parametrize("steps,world,nearest", [(2, 8, "8"), (12, 8, "8 or 16"), (1, 2, "2"), (7, 4, "4 or 8")])
def test_an_accumulation_count_the_processes_cannot_share_names_the_nearest_valid_ones(steps, world, nearest):
    with pytest.raises(ConfigError) as info:
        micro_steps_per_rank({"gradient_accumulation_steps": steps}, world)
    assert str(info.value).endswith(f"use --gradient_accumulation_steps={nearest}")


def test_gpt2_config_runs_as_its_torchrun_command_says():
    cfg = load_config(["config/gpt2_124m.py"])
    for world in (1, 2, 4, 8):
        assert micro_steps_per_rank(cfg, world) * world * cfg["batch_size"] == 64


def two_ranks(rank, store, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mean = all_reduce_mean(torch.tensor([1.0 + rank, 10.0 * rank]), 2)
        model = wrap_ddp(torch.nn.Linear(2, 2), "cpu")
        synced = getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", None))
        results[rank] = (mean.tolist(), any_rank(rank == 1, 2, "cpu"), any_rank(False, 2, "cpu"), synced)
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_on_two_gloo_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(two_ranks, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[0] == results[1] == ([1.5, 5.0], True, False, False)  # DDP re-sends no buffers per forward
    assert any_rank(True, 1, "cpu") and not any_rank(False, 1, "cpu")


# ----------------------------------------------------------------------------------------------------
# what a checkpoint carries across processes and precisions


def test_a_resume_on_another_number_of_processes_starts_fresh_random_states(tmp_path, char_dataset, capsys):
    from conftest import run_train, train_losses
    out = tmp_path / "run"
    assert run_train(out, char_dataset, max_iters=4, dropout=0.1) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["rng"]["ranks"] = ckpt["rng"]["ranks"] * 8  # as an 8-process run saves it
    torch.save(ckpt, out / "ckpt.pt")
    capsys.readouterr()
    assert run_train(out, char_dataset, max_iters=6, dropout=0.1, init_from="resume") == 0
    said = capsys.readouterr().out
    assert "saved by 8 process(es) and this run has 1: each process starts a fresh random state" in said
    assert sorted(train_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_with_every_gpus_state_resumes_bit_for_bit(tmp_path, char_dataset, monkeypatch):
    """Checkpoints once held torch.cuda.get_rng_state_all(): a list with one state per visible GPU, which
    set_rng_state_all could not restore with fewer GPUs (IndexError). Its CPU state still resumes exactly, on a
    machine with CUDA too (a CPU run leaves the GPUs' states alone)."""
    from conftest import run_train, train_losses
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert run_train(straight, char_dataset, max_iters=6, dropout=0.1, lr_decay_iters=6) == 0
    assert run_train(out, char_dataset, max_iters=3, dropout=0.1, lr_decay_iters=6) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    cpu_state = ckpt["rng"]["ranks"][0]["torch"]
    ckpt["rng"] = {"torch": cpu_state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    torch.save(ckpt, out / "ckpt.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_train(out, char_dataset, max_iters=6, dropout=0.1, lr_decay_iters=6, init_from="resume") == 0
    assert train_losses(out) == train_losses(straight)


class Positions:
    """A data position for restore_progress (the loader's part of a checkpoint)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_the_float16_gradient_scaler_is_checkpointed(tmp_path):
    from types import SimpleNamespace
    from conftest import tiny
    from sinkgpt.checkpoint import TrainProgress, load_checkpoint, save_checkpoint
    from sinkgpt.training import restore_progress
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(torch.ones(()))
    scaler.update(2.0 ** 11)  # where overflowing steps have brought it
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, optimizer, {}, TrainProgress(iter_num=7), {}, [], scaler)
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    cfg = {"reset_optimizer": True, "dataset": "x", "seed": 0}
    rt = SimpleNamespace(rank=0, world_size=1, device="cpu", master=True)
    restore_progress(cfg, load_checkpoint(str(tmp_path / "ckpt.pt")), optimizer, resumed, Positions(), rt)
    assert resumed.get_scale() == 2.0 ** 11


def test_non_finite_figures_are_written_as_strict_json(tmp_path):
    import json
    from sinkgpt.checkpoint import MetricsLog
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.write(iter=3, grad_norm=float("inf"), train_loss=2.5)

    def refuse(name):
        raise ValueError(name)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {"iter": 3, "grad_norm": None, "train_loss": 2.5}


class RankLoader:
    """Two Bigram-Backcopy-like batches whose metrics differ by rank."""

    def __init__(self, rank):
        self.rank = rank

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def next_batch(self):
        x = torch.full((1, 4), self.rank)
        return x, x

    def eval_metrics(self, logits, x, y):
        return {"backcopy_loss": 1.0 + 2 * self.rank, "bigram_loss": 4.0 * self.rank}


def evaluate_on_rank(rank, store, results):
    import contextlib
    from conftest import tiny
    from sinkgpt.training import FixedBatches, evaluate
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = tiny()
        out = evaluate(model, {"val": FixedBatches(RankLoader(rank))}, 2, contextlib.nullcontext(), 2)
        results[rank] = (out["val_backcopy_loss"], out["val_bigram_loss"])
    finally:
        torch.distributed.destroy_process_group()


def test_bigram_backcopy_metrics_are_averaged_over_the_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(evaluate_on_rank, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[0] == results[1] == (2.0, 2.0)


def test_each_rank_draws_its_own_dropout_masks():
    from sinkgpt.training import seed_rank
    masks = []
    for rank in (0, 1, 0):
        seed_rank({"seed": 1337}, rank)
        masks.append(torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_a_model_too_large_for_the_gpu_is_one_line_naming_the_sizes(monkeypatch):
    from sinkgpt.runtime import check_fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    check_fits(2 * 2**30, "cuda:0", "training")
    check_fits(10 * 2**40, "cpu", "training")  # a CPU has no such check
    with pytest.raises(RunError) as info:
        check_fits(int(7.5 * 2**30), "cuda:0", "training 470M parameters")
    assert str(info.value) == ("training 470M parameters needs 7.5 GiB, but cuda:0 has 3.0 GiB free of 80.0 GiB: "
                               "use a smaller model or a GPU with more memory")


def test_a_gpu_process_sets_its_device_first_and_starts_nccl(gpus, monkeypatch):
    """torch.cuda.is_bf16_supported() before set_device opens a context on GPU 0 from every rank; and a named
    GPU (cuda:N) under torchrun was given gloo."""
    import torch.distributed as dist
    from sinkgpt.runtime import setup_runtime
    gpus(2)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: calls.append(("is_bf16_supported",)) or True)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    rt = setup_runtime({"device": "cuda:1", "dtype": "auto", "backend": "nccl", "ddp_timeout": 60})
    assert calls[:3] == [("set_device", "cuda:1"), ("init", "nccl"), ("is_bf16_supported",)]  # (autocast asks again)
    assert (rt.device, rt.dtype) == ("cuda:1", "bfloat16")
