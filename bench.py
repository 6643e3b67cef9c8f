"""
Benchmark training steps (and, with --generate, KV-cache generation) on this machine.

    python bench.py config/train_shakespeare_char.py                  # ms/iter, tokens/s, MFU, peak memory
    python bench.py config/gpt2_124m.py --compare=sink=none,token,logit,kv_bias --json
    python bench.py --generate                                        # GPT-2 124M, 512-token prompt, 64 new tokens
    python bench.py config/nanogpt_cpu_mini.py --profile              # where a step's time goes, by op family
    python bench.py --init_from=data/models/SmolLM2-135M-Instruct --batch_size=4 --block_size=256 --vs_transformers
    python bench.py --init_from=data/models/SmolLM2-135M-Instruct --generate --prompt_tokens=256 --vs_transformers

Steps run on random tokens (the dataset only sets the vocabulary; a pretrained folder brings its own) through
train.py's own training step, timed by sinkgpt.benchmark. --compare=KEY=V1,V2,... times every variant in one
process, interleaved in rounds, and reports each one's median ms/iter and its ratio to the first (compare ratios,
not absolute times). --profile splits a step's time by op family. --vs_transformers (sinkgpt.vs_transformers)
puts transformers' own model of an --init_from folder beside ours; --generate --decode_floor (sinkgpt.decode_floor)
times what a token costs at least. docs/performance.md has the measurements; docs/reference.md every flag.
"""

import json
import os
import statistics
import sys

import torch

from sinkgpt.benchmark import (OurGenerator, generation_model, make_runners, no_cache_tokens_per_s, own_step_peak_mb,
                               peak_memory_mb, peak_rss_of, profile_steps, random_prompt, time_generation,
                               time_in_rounds)
from sinkgpt.common import InputError
from sinkgpt.config import ConfigError, load_config
from sinkgpt.decode_floor import decode_floor, floor_lines
from sinkgpt.runtime import autocast_context, device_name, keep_freed_memory, peak_flops, pick_device, pick_dtype
from sinkgpt.vs_transformers import TransformersGenerator

BENCH_FLAGS = {"json": False, "generate": False, "profile": False, "steps": 10, "warmup": 3, "rounds": 3,
               "compare": "", "vocab_size": 0, "no_cache_steps": 0, "vs_transformers": False, "prompt_tokens": 512,
               "new_tokens": 64, "decode_floor": False, "compile_transformers": False}


def parse_args(argv):
    """(bench.py's own flags, the training config): both parsed by the configurator, so config files, --key=value
    and the one-line errors work as in train.py; a bare --json, --generate or --profile means True."""
    cfg = load_config(argv, script_keys=BENCH_FLAGS)
    flags = {key: cfg.pop(key) for key in BENCH_FLAGS}
    for key, least in (("steps", 1), ("rounds", 1), ("warmup", 0), ("vocab_size", 0), ("no_cache_steps", 0),
                       ("prompt_tokens", 1), ("new_tokens", 1)):
        if flags[key] < least:
            raise ConfigError(f"flag --{key} must be >= {least}, got {flags[key]}")
    if flags["vs_transformers"] and not os.path.isdir(cfg["init_from"]):
        raise ConfigError("--vs_transformers needs --init_from=DIR, a pretrained folder both models load")
    if flags["decode_floor"] and not flags["generate"]:
        raise ConfigError("--decode_floor measures generation: add --generate")
    if flags["compile_transformers"] and (flags["generate"] or not flags["vs_transformers"]):
        raise ConfigError("--compile_transformers compiles transformers' model for the training step: add "
                          "--vs_transformers, without --generate")
    if flags["vs_transformers"] and flags["compare"]:
        raise ConfigError("--vs_transformers and --compare do not combine: compare one thing at a time")
    return flags, cfg


def bench_training(cfg, flags):
    """The training step of every variant, timed in interleaved rounds; then each one's own peak memory, the first
    one's --profile split and, for --vs_transformers on a CPU, each one's peak RSS in a process of its own."""
    device = pick_device(cfg["device"])
    if device == "cpu":
        keep_freed_memory()  # as train.py does
    named = make_runners(cfg, flags, device)
    names, runners = [n for n, _ in named], [r for _, r in named]
    times = time_in_rounds(runners, flags["warmup"], flags["steps"], flags["rounds"])
    own_peaks = [own_step_peak_mb(runner, 1) for runner in runners]
    profiled = profile_steps(runners[0], flags["steps"]) if flags["profile"] else None
    results = variant_results(names, runners, times, own_peaks, device)
    if flags["vs_transformers"] and device == "cpu":
        for result in results:
            result["peak_rss_mb"] = peak_rss_of(cfg, flags, result["variant"])
    return dict(device=device_name(device), peak_mem_mb=peak_memory_mb(device), variants=results,
                **{k: results[0][k] for k in ("ms_per_iter", "tokens_per_s", "mfu", "params")},
                **({"profile": profiled} if profiled else {}))


def variant_results(names, runners, times, own_peaks, device):
    """Each variant's figures: the median of its rounds' ms/iter, tokens/s, MFU (None where the device's peak is
    unknown), its ratio to the first variant, its parameters and its own peak memory."""
    peak = peak_flops(device)
    results = []
    ours = runners[0].model  # transformers' model does the same FLOPs as ours (--vs_transformers)
    for name, runner, ms, own_peak in zip(names, runners, times, own_peaks):
        ms_per_iter = statistics.median(ms)
        model = runner.model if hasattr(runner.model, "flops_per_token") else ours
        flops = model.flops_per_token(runner.cfg["block_size"]) * runner.tokens_per_step
        results.append(dict(variant=name, ms_per_iter=ms_per_iter, ms_rounds=ms,
                            tokens_per_s=runner.tokens_per_step / ms_per_iter * 1000,
                            mfu=flops / (ms_per_iter / 1000) / peak if peak else None,
                            ratio=ms_per_iter / statistics.median(times[0]),
                            params=runner.model.num_params(), peak_mem_mb=own_peak))
    return results


@torch.no_grad()
def bench_generation(cfg, flags):
    """Greedy KV-cache generation: --prompt_tokens of prompt, then --new_tokens. The model is --init_from's
    pretrained folder, or GPT-2 124M with random weights; --vs_transformers times transformers' generate on the
    same folder beside ours, interleaved, and checks that both produce the same tokens."""
    device = pick_device(cfg["device"])
    if device == "cpu":
        keep_freed_memory()
    model = generation_model(cfg["init_from"], device)
    n_prompt, n_new = flags["prompt_tokens"], flags["new_tokens"]
    if n_prompt + n_new > model.config.block_size:
        raise ConfigError(f"--prompt_tokens + --new_tokens must fit the context ({model.config.block_size})")
    prompt = random_prompt(model.config.vocab_size, n_prompt, device)
    generators = [OurGenerator(model)]
    if flags["vs_transformers"]:
        generators.append(TransformersGenerator(cfg["init_from"], device))
    device_type = device.split(":")[0]
    precision = autocast_context(device_type, pick_dtype(cfg["dtype"], device_type))  # as sample.py runs
    results, outputs = time_generation(generators, prompt, n_new, flags["rounds"], precision, device)
    result = dict(device=device_name(device), params=model.num_params(), prompt_tokens=n_prompt, new_tokens=n_new,
                  rounds=flags["rounds"], peak_mem_mb=peak_memory_mb(device), variants=results,
                  **{k: results[0][k] for k in ("total_s", "tokens_per_s", "prefill_s", "decode_tokens_per_s")})
    if flags["vs_transformers"]:
        result["speedup"] = results[1]["total_s"] / results[0]["total_s"]
        result["same_tokens"] = torch.equal(outputs["ours"], outputs["transformers"])
    if flags["decode_floor"]:
        floor = result["decode_floor"] = decode_floor(model, prompt, flags["rounds"])
        if flags["vs_transformers"] and floor["minimal_step_ms"] is not None:  # what the fewest ops would score
            at_minimal = results[0]["prefill_s"] + (n_new - 1) * floor["minimal_step_ms"] / 1e3
            floor["speedup_at_minimal_step"] = results[1]["total_s"] / at_minimal
    if flags["no_cache_steps"]:  # the recompute-everything baseline, extrapolated from a few steps
        result["no_cache_tokens_per_s"] = no_cache_tokens_per_s(model, prompt, flags["no_cache_steps"], precision,
                                                                device)
    return result


def print_generation(result):
    for r in result["variants"]:
        print(f"{r['variant']:>12} on {result['device']}: {r['tokens_per_s']:.1f} tokens/s for "
              f"{result['new_tokens']} new tokens after a {result['prompt_tokens']}-token prompt (prefill "
              f"{r['prefill_s']:.2f} s, decode {r['decode_tokens_per_s']:.1f} tokens/s)")
    if "no_cache_tokens_per_s" in result:
        print(f"ours without the KV cache: {result['no_cache_tokens_per_s']:.2f} tokens/s")
    if "speedup" in result:
        print(f"ours / transformers: x{result['speedup']:.2f} end to end; same tokens: {result['same_tokens']}")
    if "decode_floor" in result:
        print("\n".join(floor_lines(result["decode_floor"])))


def print_training(result):
    print(f"device {result['device']}, {result['params'] / 1e6:.2f}M params, peak memory "
          f"{result['peak_mem_mb']:.0f} MB")
    for r in result["variants"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"  peak RSS {r['peak_rss_mb']:.0f} MB (own process)" if "peak_rss_mb" in r else ""
        print(f"{r['variant']:>24}: {r['ms_per_iter']:8.2f} ms/iter  {r['tokens_per_s']:10,.0f} tok/s  "
              f"MFU {mfu:>6}  x{r['ratio']:.3f}{memory}")
    if "profile" in result:
        p = result["profile"]
        print(f"where {result['variants'][0]['variant']}'s time goes ({p['steps']} steps under torch.profiler, "
              f"{p['ms_per_step']:.2f} ms/step with its overhead):")
        for family, ms in sorted(p["ms_by_family"].items(), key=lambda kv: -kv[1]):
            print(f"{family:>24}: {ms:8.2f} ms/step  {100 * ms / p['ms_per_step']:5.1f}%")


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
        print_generation(result)
    else:
        print_training(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
