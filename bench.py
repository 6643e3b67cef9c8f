"""
Benchmark training steps (and, with --generate, KV-cache generation) on this machine.

    python bench.py config/train_shakespeare_char.py                  # ms/iter, tokens/s, MFU, peak memory
    python bench.py config/gpt2_124m.py --compare=sink=none,token,logit,kv_bias --json
    python bench.py --generate                                        # GPT-2 124M, 512-token prompt, 64 new tokens
    python bench.py config/nanogpt_cpu_mini.py --profile              # where a step's time goes, by op family

Steps run on random tokens (no dataset needed) through the same model, optimizer and precision code as
train.py. --compare=KEY=V1,V2,... times every variant in one process, interleaved in rounds, and reports
each variant's median ms/iter and its ratio to the first: compare ratios, not absolute times, on a noisy machine.
--profile then runs --steps more steps of the first variant under torch.profiler and splits their time by op
family (matmul, attention, activation, norm, loss, optimizer, other ops, and what no op accounts for).
"""

import json
import resource
import statistics
import sys
import time

import torch

from model import GPT, GPTConfig
from sinkgpt.common import InputError
from sinkgpt.config import ConfigError, check_ranges, check_value, load_config, model_config, parse_flag_value
from sinkgpt.generation import decode_layout
from sinkgpt.loader import loader_for_run
from sinkgpt.optim import build_optimizer
from sinkgpt.runtime import (autocast_context, device_name, keep_freed_memory, peak_flops, pick_device, pick_dtype,
                             synchronize, use_compile)
from sinkgpt.training import train_step

BENCH_FLAGS = {"json": False, "generate": False, "profile": False, "steps": 10, "warmup": 3, "rounds": 3,
               "compare": "", "vocab_size": 0, "no_cache_steps": 0}

# op families for --profile: an op belongs to the first family one of whose name fragments it contains
OP_FAMILIES = [
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")),
    ("activation", ("gelu", "relu", "silu", "sigmoid", "tanh", "glu")),
    ("norm", ("layer_norm", "rms_norm")),
    ("loss", ("log_softmax", "nll_loss")),
]


def parse_args(argv):
    """(bench.py's own flags, the training config): both parsed by the configurator, so config files, --key=value
    and the one-line errors work as in train.py; a bare --json, --generate or --profile means True."""
    cfg = load_config(argv, script_keys=BENCH_FLAGS)
    flags = {key: cfg.pop(key) for key in BENCH_FLAGS}
    for key, least in (("steps", 1), ("rounds", 1), ("warmup", 0), ("vocab_size", 0), ("no_cache_steps", 0)):
        if flags[key] < least:
            raise ConfigError(f"flag --{key} must be >= {least}, got {flags[key]}")
    return flags, cfg


def parse_compare(text):
    """--compare=KEY=V1,V2,...: [(key, value), ...], each value checked as the config key's."""
    key, sep, values = text.partition("=")
    if not sep or not values:
        raise ConfigError(f"--compare={text} needs the form KEY=V1,V2,... (e.g. --compare=sink=none,logit)")
    return [(key, check_value(key, parse_flag_value(v, key), "--compare")) for v in values.split(",")]


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def dataset_vocab(cfg, override):
    """The dataset's vocabulary size (the bundled ones are prepared if needed); GPT-2's when it is unknown."""
    if override:
        return override
    try:  # the loader train.py would use, on the smallest windows
        return loader_for_run(dict(cfg, batch_size=1, block_size=1), "val", "cpu").vocab_size
    except InputError:
        return 50257


class StepRunner:
    """One model + optimizer, stepped on random batches by train.py's own training step."""

    def __init__(self, cfg, vocab_size, device):
        self.device, self.cfg = device, cfg
        device_type = device.split(":")[0]
        torch.manual_seed(cfg["seed"])
        self.model = GPT(model_config(cfg, vocab_size, bos_token=vocab_size - 1)).to(device)
        self.optimizer = build_optimizer(self.model, cfg, device_type)
        dtype = pick_dtype(cfg["dtype"], device_type)
        self.ctx = autocast_context(device_type, dtype)
        self.scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
        self.step_model = torch.compile(self.model) if use_compile(cfg["compile"], device_type) else self.model
        shape = (cfg["batch_size"], cfg["block_size"])
        self.batch = (torch.randint(0, vocab_size, shape, device=device),
                      torch.randint(0, vocab_size, shape, device=device))
        self.tokens_per_step = shape[0] * shape[1] * cfg["gradient_accumulation_steps"]

    def step(self):
        train_step(self.step_model, self.optimizer, self.scaler, self.batch, lambda: self.batch,
                   self.cfg["gradient_accumulation_steps"], self.ctx, self.cfg["grad_clip"], self.model.parameters())

    def time_steps(self, n):
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        synchronize(self.device)
        return 1000 * (time.perf_counter() - t0) / n


def bench_training(cfg, flags):
    device = pick_device(cfg["device"])
    if device == "cpu":
        keep_freed_memory()  # as train.py does
    vocab_size = dataset_vocab(cfg, flags["vocab_size"])
    variants = parse_compare(flags["compare"]) if flags["compare"] else [(None, None)]
    runners = []
    for key, value in variants:
        variant_cfg = dict(cfg, **({key: value} if key else {}))
        check_ranges(variant_cfg)  # the variant's whole config must still be valid (e.g. n_embd % n_head)
        runner = StepRunner(variant_cfg, vocab_size, device)
        runner.time_steps(flags["warmup"])
        runners.append(runner)
    times = [[] for _ in runners]
    for r in range(flags["rounds"]):  # interleave variants, rotating who goes first, so noise hits all alike
        for i in [(r + j) % len(runners) for j in range(len(runners))]:
            times[i].append(runners[i].time_steps(flags["steps"]))
    profiled = profile_steps(runners[0], flags["steps"]) if flags["profile"] else None
    peak = peak_flops(device)
    results = []
    for (key, value), runner, ms in zip(variants, runners, times):
        ms_per_iter = statistics.median(ms)
        flops = runner.model.flops_per_token(cfg["block_size"]) * runner.tokens_per_step
        results.append(dict(variant=f"{key}={value}" if key else "base", ms_per_iter=ms_per_iter,
                            tokens_per_s=runner.tokens_per_step / ms_per_iter * 1000,
                            mfu=flops / (ms_per_iter / 1000) / peak if peak else None,
                            ratio=ms_per_iter / statistics.median(times[0]),
                            params=runner.model.num_params()))
    return dict(device=device_name(device), peak_mem_mb=peak_memory_mb(device), variants=results,
                **{k: results[0][k] for k in ("ms_per_iter", "tokens_per_s", "mfu", "params")},
                **({"profile": profiled} if profiled else {}))


def op_family(event):
    """The --profile family of one profiled op: anything inside the optimizer's step, zero_grad or the gradient
    clipping counts as optimizer, whatever the op; otherwise the first family one of whose name fragments the op's
    name holds."""
    parent = event
    while parent is not None:
        if parent.name.startswith(("Optimizer.", "clip_grad_norm")):
            return "optimizer"
        parent = parent.cpu_parent
    for family, fragments in OP_FAMILIES:
        if any(f == event.name if f.startswith("aten::") else f in event.name for f in fragments):
            return family
    return "other ops"


def profile_steps(runner, steps):
    """Run `steps` training steps under torch.profiler; ms per step by op family, from each op's self time (device
    time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile
    on_cuda = runner.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        ms_per_step = runner.time_steps(steps)
    families = dict.fromkeys([f for f, _ in OP_FAMILIES] + ["optimizer", "other ops"], 0.0)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # a CUDA kernel: its time is already its launching op's self device time
        self_us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        families[op_family(event)] += self_us / 1000 / steps
    families["unattributed"] = max(0.0, ms_per_step - sum(families.values()))  # Python and framework time
    return dict(steps=steps, ms_per_step=ms_per_step, ms_by_family=families)


@torch.no_grad()
def bench_generation(cfg, flags):
    """GPT-2 124M with random weights: a 512-token prompt, then 64 new tokens, greedy, with the KV cache."""
    device = pick_device(cfg["device"])
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).eval()
    if device == "cpu":
        keep_freed_memory()
    prompt = torch.randint(0, 50257, (1, 512), device=device)
    t0 = time.perf_counter()
    with decode_layout(model):  # first call: on CPU it makes the (in, out) weight copies
        model.generate(prompt[:, :1], 1, temperature=0)
    first_call_s = time.perf_counter() - t0
    with decode_layout(model):  # warm-up
        model.generate(prompt[:, :16], 4, temperature=0)

    def seconds(n_new):
        synchronize(device)
        t0 = time.perf_counter()
        with decode_layout(model):
            model.generate(prompt, n_new, temperature=0)
        synchronize(device)
        return time.perf_counter() - t0

    prefills, totals = [], []
    for _ in range(flags["rounds"]):  # median of rounds: single runs swing by 20% on a shared machine
        prefills.append(seconds(1))
        totals.append(seconds(64))
    prefill_s, total_s = statistics.median(prefills), statistics.median(totals)
    result = dict(device=device_name(device), params=model.num_params(), prompt_tokens=512, new_tokens=64,
                  rounds=flags["rounds"], total_s=total_s, tokens_per_s=64 / total_s, prefill_s=prefill_s,
                  decode_tokens_per_s=63 / max(total_s - prefill_s, 1e-9), first_call_s=first_call_s,
                  tokens_per_s_with_first_call=64 / (total_s + first_call_s), peak_mem_mb=peak_memory_mb(device))
    if flags["no_cache_steps"]:  # the recompute-everything baseline, extrapolated from a few steps
        t0 = time.perf_counter()
        model.generate(prompt, flags["no_cache_steps"], temperature=0, use_cache=False)
        result["no_cache_tokens_per_s"] = flags["no_cache_steps"] / (time.perf_counter() - t0)
    return result


def main(argv):
    try:
        flags, cfg = parse_args(argv)
        result = bench_generation(cfg, flags) if flags["generate"] else bench_training(cfg, flags)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if flags["json"]:
        print(json.dumps(result))
    elif flags["generate"]:
        print(f"{result['device']}: {result['tokens_per_s']:.1f} tokens/s for 64 new tokens after a 512-token "
              f"prompt (prefill {result['prefill_s']:.2f} s, decode {result['decode_tokens_per_s']:.1f} tokens/s); "
              f"{result['tokens_per_s_with_first_call']:.1f} tokens/s counting the model's first call "
              f"({result['first_call_s']:.2f} s, which makes the decode weight copies)"
              + (f"; without cache {result['no_cache_tokens_per_s']:.2f} tokens/s" if "no_cache_tokens_per_s"
                 in result else ""))
    else:
        print(f"device {result['device']}, {result['params'] / 1e6:.2f}M params, peak memory "
              f"{result['peak_mem_mb']:.0f} MB")
        for r in result["variants"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{r['variant']:>24}: {r['ms_per_iter']:8.2f} ms/iter  {r['tokens_per_s']:10,.0f} tok/s  "
                  f"MFU {mfu:>6}  x{r['ratio']:.3f}")
        if "profile" in result:
            p = result["profile"]
            print(f"where {result['variants'][0]['variant']}'s time goes ({p['steps']} steps under torch.profiler, "
                  f"{p['ms_per_step']:.2f} ms/step with its overhead):")
            for family, ms in sorted(p["ms_by_family"].items(), key=lambda kv: -kv[1]):
                print(f"{family:>24}: {ms:8.2f} ms/step  {100 * ms / p['ms_per_step']:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
