"""
The machinery bench.py times with: train.py's training step on random batches, one StepRunner per --compare
variant (or ours beside transformers', --vs_transformers), each runner's own peak memory, the split of a step's
time by op family (--profile), and greedy KV-cache generation timed in interleaved rounds (--generate).

    runners = make_runners(cfg, flags, device)      # [(variant name, StepRunner)], flags as bench.py parses them
    ms_per_iter = runners[0][1].time_steps(10)
    profile = profile_steps(runners[0][1], 10)      # {steps, ms_per_step, ms_by_family}
    results, outputs = time_generation([OurGenerator(model)], prompt, 64, 3, precision, device)

May import: model, sinkgpt.common, sinkgpt.config, sinkgpt.generation, sinkgpt.loader, sinkgpt.optim,
sinkgpt.pretrained, sinkgpt.runtime, sinkgpt.training, sinkgpt.vs_transformers.
"""

import contextlib
import os
import resource
import statistics
import sys
import time

import torch

from model import GPT, GPTConfig
from sinkgpt.common import InputError
from sinkgpt.config import ConfigError, check_ranges, check_value, model_config, parse_flag_value
from sinkgpt.generation import decode_layout
from sinkgpt.loader import loader_for_run
from sinkgpt.optim import build_optimizer
from sinkgpt.pretrained import from_pretrained
from sinkgpt.runtime import autocast_context, keep_freed_memory, pick_dtype, synchronize, use_compile
from sinkgpt.training import build_model, train_step
from sinkgpt.vs_transformers import TransformersModel, peak_rss_in_own_process, transformers_optimizer

# op families for --profile: an op belongs to the first family one of whose name fragments it contains
OP_FAMILIES = [
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")),
    ("activation", ("gelu", "relu", "silu", "sigmoid", "tanh", "glu")),
    ("norm", ("layer_norm", "rms_norm")),
    ("loss", ("log_softmax", "nll_loss")),
]


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
    """The dataset's vocabulary size (the bundled ones are prepared if needed, saying so on stderr: stdout may be
    --json's); GPT-2's when it is unknown."""
    if override:
        return override
    try:  # the loader train.py would use, on the smallest windows
        with contextlib.redirect_stdout(sys.stderr):
            return loader_for_run(dict(cfg, batch_size=1, block_size=1), "val", "cpu").vocab_size
    except InputError:
        return 50257


def bench_model(cfg, vocab_size):
    """The model to time, as train.py builds it: a pretrained folder's (--init_from=DIR, with the variant's sink
    options, cropped to block_size), else a fresh one."""
    torch.manual_seed(cfg["seed"])
    if cfg["init_from"] in ("scratch", "resume"):
        return GPT(model_config(cfg, vocab_size, bos_token=vocab_size - 1))
    model = build_model(cfg, vocab_size, bos_token=vocab_size - 1)
    if cfg["block_size"] > model.config.block_size:
        raise ConfigError(f"block_size={cfg['block_size']} is longer than {cfg['init_from']}'s context "
                          f"({model.config.block_size})")
    return model


class StepRunner:
    """One model + optimizer, stepped on random batches by train.py's own training step; compiled as the config's
    compile key says, unless compile_model says otherwise."""

    def __init__(self, cfg, model, device, optimizer=None, name="ours", compile_model=None):
        self.device, self.cfg, self.name = device, cfg, name
        device_type = device.split(":")[0]
        self.model = model.to(device)
        self.optimizer = optimizer or build_optimizer(self.model, cfg, device_type)
        dtype = pick_dtype(cfg["dtype"], device_type)
        self.ctx = autocast_context(device_type, dtype)
        self.scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
        compiled = use_compile(cfg["compile"], device_type) if compile_model is None else compile_model
        self.step_model = torch.compile(self.model) if compiled else self.model
        shape = (cfg["batch_size"], cfg["block_size"])
        vocab_size = self.model.config.vocab_size
        generator = torch.Generator().manual_seed(cfg["seed"])
        self.batch = tuple(torch.randint(0, vocab_size, shape, generator=generator).to(device) for _ in range(2))
        self.tokens_per_step = shape[0] * shape[1] * cfg["gradient_accumulation_steps"]

    def step(self):
        train_step(self.step_model, self.optimizer, self.scaler, self.batch, lambda: self.batch,
                   self.cfg["gradient_accumulation_steps"], self.ctx, self.cfg["grad_clip"], self.model.parameters())

    def resident_mb(self):
        """What this runner holds between steps: its parameters, optimizer state and batch (gradients are
        freed by zero_grad)."""
        tensors = [*self.model.parameters(), *self.batch]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    def time_steps(self, n):
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        synchronize(self.device)
        return 1000 * (time.perf_counter() - t0) / n


def transformers_runner(cfg, device, compiled):
    model = TransformersModel(cfg["init_from"]).train()
    return StepRunner(cfg, model, device, optimizer=transformers_optimizer(model, cfg), name="transformers",
                      compile_model=compiled)


def make_runners(cfg, flags, device, only=None):
    """[(variant name, StepRunner)]: the --compare variants, or ours and transformers' (--vs_transformers; `only`
    builds just one of the two)."""
    # a pretrained folder brings its vocabulary (the steps draw random ids of it): no dataset is read for it
    vocab_size = 0 if os.path.isdir(cfg["init_from"]) else dataset_vocab(cfg, flags["vocab_size"])
    if flags["vs_transformers"]:
        makers = {"ours": lambda: StepRunner(cfg, bench_model(cfg, vocab_size), device),
                  "transformers": lambda: transformers_runner(cfg, device, flags["compile_transformers"])}
        return [(name, make()) for name, make in makers.items() if only in (None, name)]
    variants = parse_compare(flags["compare"]) if flags["compare"] else [(None, None)]
    allow_recompiles(len(variants))
    runners = []
    for key, value in variants:
        variant_cfg = dict(cfg, **({key: value} if key else {}))
        check_ranges(variant_cfg)  # the variant's whole config must still be valid (e.g. n_embd % n_head)
        name = f"{key}={value}" if key else "base"
        runners.append((name, StepRunner(variant_cfg, bench_model(variant_cfg, vocab_size), device)))
    return runners


def allow_recompiles(n_models):
    """torch.compile of n models that share their classes compiles the same code objects n times over; past
    dynamo's limit per code object (8) the rest would silently run eager."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 8 * n_models))


def time_in_rounds(runners, warmup, steps, rounds):
    """Each runner's ms per step after `warmup` steps, one figure per round: [[ms, ...] per runner]."""
    for runner in runners:
        if warmup:
            runner.time_steps(warmup)
    times = [[] for _ in runners]
    for r in range(rounds):  # interleave variants, rotating who goes first, so noise hits all alike
        for i in [(r + j) % len(runners) for j in range(len(runners))]:
            times[i].append(runners[i].time_steps(steps))
    return times


def own_step_peak_mb(runner, steps):
    """One runner's peak device memory when it runs alone: what it holds (resident_mb) plus the most its steps
    allocate above what every runner holds together. CUDA only (None elsewhere: a CPU process has one peak)."""
    if not runner.device.startswith("cuda"):
        return None
    held = torch.cuda.memory_allocated(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    runner.time_steps(steps)
    return runner.resident_mb() + (torch.cuda.max_memory_allocated(runner.device) - held) / 2**20


def peak_rss_of(cfg, flags, which):
    """Peak RSS (MB) of a fresh process that builds one runner (ours or transformers') and takes warm-up + 2 steps."""
    return peak_rss_in_own_process(_warm_up_runner, (cfg, flags, which), which)


def _warm_up_runner(cfg, flags, which):
    torch.set_num_threads(1)
    keep_freed_memory()
    runner = dict(make_runners(cfg, flags, "cpu", only=which))[which]
    runner.time_steps(max(1, flags["warmup"]) + 2)


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


class OurGenerator:
    """Our greedy KV-cache generation, as sample.py runs it (the CPU decode layout on)."""
    name = "ours"

    def __init__(self, model):
        self.model = model

    def __call__(self, prompt, n_new):
        with decode_layout(self.model):
            return self.model.generate(prompt, n_new, temperature=0)


def generation_model(init_from, device):
    """The model --generate times, in eval mode: a pretrained folder's, or GPT-2 124M with random weights."""
    torch.manual_seed(0)
    pretrained = os.path.isdir(init_from)
    return (from_pretrained(init_from) if pretrained else GPT(GPTConfig())).to(device).eval()


def random_prompt(vocab_size, n_prompt, device):
    """(1, n_prompt) random token ids, the same in every run."""
    prompt = torch.randint(0, vocab_size, (1, n_prompt), generator=torch.Generator().manual_seed(0))
    return prompt.to(device)


@torch.no_grad()
def time_generation(generators, prompt, n_new, rounds, precision, device):
    """Each generator warmed up, then timed in `rounds` interleaved rounds, the order rotated: the prefill (one new
    token) and the whole generation of n_new tokens, under `precision`. ([per generator: variant, median seconds,
    tokens/s], {generator name: its last output})."""
    with precision:
        outputs = {g.name: g(prompt[:, :16], 4) for g in generators}  # warm-up

    def seconds(generate, n):
        synchronize(device)
        t0 = time.perf_counter()
        with precision:
            outputs[generate.name] = generate(prompt, n)
        synchronize(device)
        return time.perf_counter() - t0

    prefills, totals = {g.name: [] for g in generators}, {g.name: [] for g in generators}
    for r in range(rounds):  # median of interleaved rounds: single runs swing by 20% on a shared machine
        for generate in generators[r % len(generators):] + generators[:r % len(generators)]:
            prefills[generate.name].append(seconds(generate, 1))
            totals[generate.name].append(seconds(generate, n_new))
    results = []
    for generate in generators:
        prefill_s, total_s = statistics.median(prefills[generate.name]), statistics.median(totals[generate.name])
        results.append(dict(variant=generate.name, total_s=total_s, total_s_rounds=totals[generate.name],
                            tokens_per_s=n_new / total_s, prefill_s=prefill_s,
                            decode_tokens_per_s=(n_new - 1) / max(total_s - prefill_s, 1e-9)))
    return results, outputs


@torch.no_grad()
def no_cache_tokens_per_s(model, prompt, n_new, precision, device):
    """Tokens/s of greedy generation that recomputes the whole sequence for every new token (no KV cache)."""
    synchronize(device)
    t0 = time.perf_counter()
    with precision:
        model.generate(prompt, n_new, temperature=0, use_cache=False)
    synchronize(device)
    return n_new / (time.perf_counter() - t0)
