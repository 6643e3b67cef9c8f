"""The GPU launch rules without a GPU: the device each torchrun process takes, the dtype, the MFU peak and the
accumulation count, with torch.cuda's answers and torchrun's environment monkeypatched; the collectives on two
gloo processes."""
import itertools

import pytest
import torch
import torch.multiprocessing as mp

from sinkgpt.common import RunError
from sinkgpt.config import ConfigError, load_config
from sinkgpt.runtime import PEAK_FLOPS, all_reduce_mean, any_rank, peak_flops_of, pick_device, pick_dtype
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
        results[rank] = (mean.tolist(), any_rank(rank == 1, 2, "cpu"), any_rank(False, 2, "cpu"))
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_on_two_gloo_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(two_ranks, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[0] == results[1] == ([1.5, 5.0], True, False)
    assert any_rank(True, 1, "cpu") and not any_rank(False, 1, "cpu")
