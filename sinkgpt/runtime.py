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
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from sinkgpt.common import RunError

# dense bf16 peak FLOP/s of the accelerators we know (MFU is null elsewhere)
PEAK_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
              "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
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


def setup_distributed(cfg):
    """(rank, local_rank, world_size); initialises the process group when launched by torchrun."""
    if not distributed_launch():
        return 0, 0, 1
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available() and cfg["device"] in ("auto", "cuda")
    dist.init_process_group(backend=cfg["backend"] if use_cuda else "gloo",
                            timeout=timedelta(seconds=cfg["ddp_timeout"]))
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


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
    """The mean of a tensor over the ranks (the tensor itself in a single process)."""
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def setup_runtime(cfg):
    """Processes, device and precision of a training run, from the config's system keys."""
    rank, local_rank, world_size = setup_distributed(cfg)
    device = pick_device(cfg["device"], local_rank)
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg["dtype"], device_type)
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device_type == "cpu":
        keep_freed_memory()
    return Runtime(rank, local_rank, world_size, device, dtype, autocast_context(device_type, dtype))


def mps_available():
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(requested, local_rank=0):
    """'auto' picks cuda, then mps, then cpu. A named device must exist on this machine (RunError otherwise);
    a bare 'cuda' means this process's GPU under torchrun, cuda:0 alone."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise RunError(f"device {requested!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"device {requested!r}: CUDA is not available here (use --device=cpu or auto)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RunError(f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    if device.type == "mps" and not mps_available():
        raise RunError(f"device {requested!r}: MPS is not available here (use --device=cpu or auto)")
    if device.type not in ("cpu", "mps"):
        raise RunError(f"device {requested!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device.type


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
    recorded) as float32."""
    if requested == "float16" and device_type == "cpu":
        return "float32"
    if requested != "auto":
        return requested
    return "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


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
    name = torch.cuda.get_device_name(torch.device(device))
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


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
