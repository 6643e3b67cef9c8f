"""
Where a run executes: processes (DDP under torchrun), the device, the precision, torch.compile, the memory
allocator, and the device's peak FLOP/s for MFU.

    rt = setup_runtime(cfg)     # rank, world size, device, dtype, autocast context
    with rt.autocast: ...

May import: sinkgpt.common.
"""

import contextlib
import ctypes
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from sinkgpt.common import RunError

# dense bf16 peak FLOP/s of the accelerators we know (MFU is null elsewhere)
PEAK_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
              "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12,
              "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: str  # 'cpu', 'mps' or 'cuda:N'
    dtype: str  # what autocast really uses (pick_dtype)
    autocast: contextlib.AbstractContextManager = field(repr=False)

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def master(self):
        """Rank 0 writes the logs and checkpoints."""
        return self.rank == 0


def distributed_launch():
    """True when torchrun started this process (it sets RANK)."""
    return int(os.environ.get("RANK", -1)) != -1


def launch_ranks():
    """(local_rank, local_world_size) from torchrun's environment; (0, 1) in a single process."""
    if not distributed_launch():
        return 0, 1
    return int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def setup_distributed(cfg, device_type):
    """(rank, world_size); initialises the process group when launched by torchrun: the config's backend (NCCL)
    for CUDA devices, gloo otherwise. Called after the device is chosen and made current."""
    if not distributed_launch():
        return 0, 1
    import torch.distributed as dist
    dist.init_process_group(backend=cfg["backend"] if device_type == "cuda" else "gloo",
                            timeout=timedelta(seconds=cfg["ddp_timeout"]))
    return dist.get_rank(), dist.get_world_size()


def teardown_distributed(success):
    """Destroy the process group; after a successful run every rank first waits for the others, so no rank closes
    gloo's sockets while rank 0 still writes its checkpoint."""
    if not distributed_launch():
        return
    import torch.distributed as dist
    if dist.is_initialized():
        if success:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(value, world_size):
    """The mean of a tensor over the ranks (the tensor itself in a single process). SUM and divide: gloo has no
    ReduceOp.AVG before torch 2.6, and requirements.txt allows 2.5."""
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size
    return value


def any_rank(flag, world_size, device):
    """True on every rank when `flag` is true on at least one (a collective: every rank must call it at the same
    point). How the ranks agree on a stop that a signal delivered to some of them first."""
    if world_size == 1:
        return bool(flag)
    import torch.distributed as dist
    agreed = torch.tensor(int(bool(flag)), device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return bool(agreed.item())


def wrap_ddp(model, device):
    """DistributedDataParallel on the GPU the model is on (cuda:0 under per-rank binding), without syncing
    buffers every forward: the only buffers are the rotary tables, the same on every rank, which DDP would
    otherwise re-broadcast each step (forward_sync_buffers from torch 2.13, broadcast_buffers before it)."""
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    device = torch.device(device)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})


def setup_runtime(cfg):
    """Processes, device and precision of a training run, from the config's system keys. The device is made
    current before anything touches CUDA (otherwise every rank opens a context on GPU 0)."""
    local_rank, local_world_size = launch_ranks()
    device = pick_device(cfg["device"], local_rank, local_world_size)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rank, world_size = setup_distributed(cfg, device_type)
    dtype = pick_dtype(cfg["dtype"], device_type)
    if device_type == "cpu":
        keep_freed_memory()
    return Runtime(rank, local_rank, world_size, device, dtype, autocast_context(device_type, dtype))


def mps_available():
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(requested, local_rank=0, local_world_size=1):
    """'auto' picks cuda, then mps, then cpu. A named device must exist on this machine (RunError otherwise).
    A bare 'cuda' means this process's GPU: cuda:0 alone; under torchrun cuda:LOCAL_RANK when the process sees
    the node's GPUs, or cuda:0 when it sees exactly one (per-rank CUDA_VISIBLE_DEVICES binding, as under SLURM)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise RunError(f"device {requested!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        return cuda_device(requested, device.index, local_rank, local_world_size)
    if device.type == "mps" and not mps_available():
        raise RunError(f"device {requested!r}: MPS is not available here (use --device=cpu or auto)")
    if device.type not in ("cpu", "mps"):
        raise RunError(f"device {requested!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device.type


def cuda_device(requested, index, local_rank, local_world_size):
    """'cuda:N' for pick_device, one GPU per process."""
    if not torch.cuda.is_available():
        raise RunError(f"device {requested!r}: CUDA is not available on this machine (use --device=cpu or auto)")
    count = torch.cuda.device_count()
    if local_world_size > 1:  # torchrun: each process takes its own GPU
        if index is not None:
            raise RunError(f"device {requested!r} would put all {local_world_size} processes on one GPU: use "
                           "--device=cuda (each process takes the GPU of its LOCAL_RANK)")
        if count >= local_world_size:
            return f"cuda:{local_rank}"
        if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):  # bound to one GPU per process
            return "cuda:0"
        raise RunError(f"torchrun started {local_world_size} processes on this node, but it has {count} GPU(s): "
                       f"use --nproc_per_node={count} or fewer")
    index = 0 if index is None else index
    if index >= count:
        raise RunError(f"device {requested!r}: this machine has {count} CUDA device(s)")
    return f"cuda:{index}"


def keep_freed_memory():
    """Ask glibc to keep freed activation buffers instead of handing them back to the OS: otherwise every step
    page-faults its multi-MB activations back in, about 5% of a small CPU step. Linux/glibc only; a no-op
    elsewhere. Memory stays at the run's peak, which a training run reaches anyway."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: buffers below 32 MB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def pick_dtype(requested, device_type):
    """The autocast dtype a run really uses: CPU autocast is bfloat16 only, so float16 on a CPU runs (and is
    recorded) as float32. On CUDA 'auto' is bfloat16 where the GPU runs it natively (compute capability >= 8),
    else float16 (with the gradient scaler), as nanoGPT chooses; bfloat16 asked of a GPU that only emulates it
    (V100, T4, RTX 20xx: torch.cuda.is_bf16_supported() is true there, but Inductor skips compiling it) is a
    RunError that names the fallback."""
    if requested == "float16" and device_type == "cpu":
        return "float32"
    if device_type == "cuda" and requested in ("auto", "bfloat16"):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            return "bfloat16" if native else "float16"
        if not native:
            raise RunError(f"dtype bfloat16: {torch.cuda.get_device_name()} only emulates it: use --dtype=float16 "
                           "(mixed precision with a gradient scaler) or --dtype=float32")
    return "float32" if requested == "auto" else requested


def autocast_context(device_type, dtype):
    """dtype as pick_dtype resolved it (which already turns float16 on a CPU into float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def use_compile(requested, device_type):
    """The config's compile key: True, False, or 'auto' (on for CUDA, where it pays; off elsewhere)."""
    return requested if requested != "auto" else device_type == "cuda"


def peak_flops(device):
    """The device's own dense bf16 peak, or None where unknown (CPUs, unlisted GPUs)."""
    if not str(device).startswith("cuda"):
        return None
    return peak_flops_of(torch.cuda.get_device_name(torch.device(device)))


def peak_flops_of(name):
    """The PEAK_FLOPS entry of a GPU name: the longest key found in it as whole words ('L4' is not in 'NVIDIA
    L40', nor 'H200' in 'NVIDIA GH200', and 'NVIDIA H100 NVL' is 'H100 NVL', not 'H100'); None if none is."""
    found = [key for key in PEAK_FLOPS if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name)]
    return PEAK_FLOPS[max(found, key=len)] if found else None


def check_fits(n_bytes, device, what):
    """RunError naming the sizes when `what` (n_bytes) cannot fit in the GPU's free memory; nothing on a CPU."""
    if not str(device).startswith("cuda"):
        return
    free, total = torch.cuda.mem_get_info(torch.device(device))
    if n_bytes > free:
        raise RunError(f"{what} needs {n_bytes / 2**30:.1f} GiB, but {device} has {free / 2**30:.1f} GiB free of "
                       f"{total / 2**30:.1f} GiB: use a smaller model or a GPU with more memory")


def synchronize(device):
    """Wait for the device's queued work (timing needs it on CUDA; CPU work is already done)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if device == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device
