"""
The GPU check: one call that runs the GPU tests and times the GPT-2 124M path on one GPU, prints a summary and
writes one JSON. Needs no prepared data (the benchmarks step on random tokens; the tests prepare their own).

    python gpu_check.py                        # about 5 minutes on one H100/H200; writes gpu_check.json
    python gpu_check.py --out=FILE.json --batch_size=16
    python gpu_check.py --cpu_dry_run          # the same steps on a tiny model on the CPU: checks the script

Steps, each in processes of its own:
1. Side by side (compilation, most of the time, runs on the CPU's cores; the GPU work is small):
   - tests/test_cuda.py in TEST_SHARDS pytest processes: every sink option trained with compile, bf16 and
     tracking, then resumed, sampled and analysed; a two-variant study; quantization and streaming; torchrun;
     bench.py;
   - one short bench.py per variant of step 2, WARM at a time: each compiles its model once, which fills
     torch.compile's on-disk caches (Inductor's FX graph cache, AOTAutograd's cache) for step 2.
2. bench.py on config/gpt2_124m.py (12 layers, 768 dims, T=1024, bf16, compiled), one optimizer step per
   micro-batch of --batch_size sequences: the baseline and every sink option in one process, interleaved, then
   the attention gates, then a sliding window of 128 against full attention; ms/iter, tokens/s, MFU, each
   variant's ratio to the baseline and its own peak memory.
   Nothing else runs meanwhile.
3. bench.py --generate: GPT-2 124M KV-cache generation (512-token prompt, 64 new tokens), bf16.

The JSON holds every figure, the goals (MFU >= 50% as llm.c reaches; every sink option within 5% of the
baseline step) and whether each is met. The exit code is 0 when every step ran and the tests passed.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

REPO = os.path.dirname(os.path.abspath(__file__))
SINKS = "sink=none,token,logit,softmax1,kv_bias,k_bias,bos_override"
GATES = "attn_gate=none,headwise,elementwise"
WINDOWS = "attn_window=0,128"  # sliding windows: FlexAttention's block mask should make 128 cheaper at T=1024
MFU_GOAL, RATIO_GOAL = 0.5, 1.05
TEST_SHARDS, WARM = 4, 3  # pytest processes for the tests; warm-up benchmarks at once (~10 GB of GPU memory each)
GPU_BENCH = ["config/gpt2_124m.py", "--gradient_accumulation_steps=1", "--steps=10", "--warmup=3", "--rounds=3"]
GPU_GENERATE = ["--generate", "--device=cuda"]
# the dry run: the same calls on a one-layer model on the CPU, float32, eager
DRY_BENCH = ["--device=cpu", "--dtype=float32", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32",
             "--block_size=16", "--batch_size=2", "--vocab_size=50", "--steps=1", "--warmup=1", "--rounds=1"]
DRY_WINDOWS = "attn_window=0,8"
DRY_GENERATE = ["--generate", "--device=cpu", "--prompt_tokens=8", "--new_tokens=4", "--rounds=1"]


def parse_args(argv):
    """{out, batch_size, cpu_dry_run}; one error line and exit code 1 for anything else."""
    args = {"out": "gpu_check.json", "batch_size": 16, "cpu_dry_run": False}
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or key not in args:
            raise SystemExit(f"error: unknown argument {arg!r} (use --out=FILE, --batch_size=N or --cpu_dry_run)")
        if key == "cpu_dry_run":
            args[key] = True
        elif key == "batch_size":
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"error: --batch_size must be a positive integer, got {value!r}")
            args[key] = int(value)
        else:
            args[key] = value
    return args


def test_ids():
    """The node ids of tests/test_cuda.py's tests."""
    listed = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                             "tests/test_cuda.py"], cwd=REPO, capture_output=True, text=True)
    return [line for line in listed.stdout.splitlines() if line.startswith("tests/test_cuda.py::")]


def start_tests(tmp):
    """tests/test_cuda.py in TEST_SHARDS pytest processes (round robin over its tests): [(process, report)]."""
    ids = test_ids()
    started = []
    for shard in range(min(TEST_SHARDS, len(ids))):
        report = os.path.join(tmp, f"junit{shard}.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                   *ids[shard::TEST_SHARDS]]
        started.append((subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL), report))
    return started


def test_counts(started, seconds):
    """{passed, failed, skipped, seconds} over the pytest processes' reports, once they have ended (a process
    that wrote no report, or no test collected at all, counts as one failure)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    unreported = 0 if started else 1
    for process, report in started:
        process.wait()
        if not os.path.exists(report):
            unreported += 1
            continue
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = counts["failures"] + counts["errors"]
    return {"passed": counts["tests"] - failed - counts["skipped"], "failed": failed + unreported,
            "skipped": counts["skipped"], "seconds": seconds}


def warm_compile_caches(bench_flags, comparisons):
    """One short bench.py per variant of the timed comparisons, WARM at a time; returns the error lines."""
    variants = [f"--compare={key}={value}" for key, values in (v.split("=") for v in comparisons)
                for value in values.split(",")]
    errors = []
    for start in range(0, len(variants), WARM):
        running = [(v, subprocess.Popen([sys.executable, "bench.py", *bench_flags, v, "--steps=1", "--warmup=1",
                                         "--rounds=1", "--json"], cwd=REPO, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)) for v in variants[start:start + WARM]]
        for variant, process in running:
            _, stderr = process.communicate()
            if process.returncode != 0:
                errors.append(f"bench.py {variant} (compile warm-up): " + (stderr.strip().splitlines() or ["?"])[-1])
    return errors


def run_bench(flags):
    """bench.py --json in a process of its own: (its result, or None, and the error's last line)."""
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "bench.py", *flags, "--json"], cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
        return None, lines[-1]
    return dict(json.loads(result.stdout), seconds=seconds), None


def training_figures(results):
    """The baseline's figures and every variant's, from the --compare results (their first variant is the
    baseline, sink=none or attn_gate=none)."""
    base = results[0]["variants"][0]
    variants = {}
    for result in results:
        for v in result["variants"]:
            variants[v["variant"]] = {k: v[k] for k in ("ms_per_iter", "ratio", "tokens_per_s", "mfu", "peak_mem_mb")}
    return {"device": results[0]["device"], "params": results[0]["params"], "ms_per_iter": base["ms_per_iter"],
            "tokens_per_s": base["tokens_per_s"], "mfu": base["mfu"], "variants": variants}


def goals(training):
    """Which of the GPU performance goals the figures meet (None: no figure to judge)."""
    slower = sorted(name for name, v in training["variants"].items() if v["ratio"] > RATIO_GOAL)
    mfu = training["mfu"]
    return {"mfu_at_least": MFU_GOAL, "mfu_met": None if mfu is None else mfu >= MFU_GOAL,
            "ratio_at_most": RATIO_GOAL, "variants_slower": slower, "ratio_met": not slower}


def summary(report):
    """The printed summary: one line per figure, the variants as a table."""
    lines = [f"GPU check on {report['device']} (torch {report['torch']}), {report['seconds']:.0f} s"]
    tests = report["tests"]
    lines.append(f"tests/test_cuda.py: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} "
                 f"skipped ({tests['seconds']:.0f} s)")
    training = report.get("training")
    if training:
        mfu = "n/a" if training["mfu"] is None else f"{100 * training['mfu']:.1f}%"
        lines.append(f"training, {training['params'] / 1e6:.1f}M params: {training['ms_per_iter']:.1f} ms/iter, "
                     f"{training['tokens_per_s']:,.0f} tokens/s, MFU {mfu}")
        lines.append(f"{'variant':<24}{'ms/iter':>10}{'ratio':>8}{'peak MB':>10}")
        for name, v in training["variants"].items():
            peak = "n/a" if v["peak_mem_mb"] is None else f"{v['peak_mem_mb']:.0f}"
            lines.append(f"{name:<24}{v['ms_per_iter']:>10.1f}{v['ratio']:>8.3f}{peak:>10}")
        met = report["goals"]
        lines.append(f"goals: MFU >= {100 * MFU_GOAL:.0f}%: {met['mfu_met']}; every variant within "
                     f"{100 * (RATIO_GOAL - 1):.0f}% of the baseline: {met['ratio_met']}"
                     + (f" (slower: {', '.join(met['variants_slower'])})" if met["variants_slower"] else ""))
    generation = report.get("generation")
    if generation:
        lines.append(f"generation: {generation['tokens_per_s']:.0f} tokens/s end to end, decode "
                     f"{generation['decode_tokens_per_s']:.0f} tokens/s, prefill {generation['prefill_s'] * 1e3:.1f} ms")
    lines += [f"error: {e}" for e in report["errors"]]
    return "\n".join(lines)


def check(args):
    """Run every step and return the report (also when a step failed: its error is in report['errors'])."""
    import torch
    t0 = time.perf_counter()
    dry = args["cpu_dry_run"]
    report = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "dry_run": dry, "errors": []}
    bench_flags = DRY_BENCH if dry else GPU_BENCH + [f"--batch_size={args['batch_size']}"]
    comparisons = (SINKS, GATES, DRY_WINDOWS if dry else WINDOWS)
    with tempfile.TemporaryDirectory() as tmp:
        started = start_tests(tmp)
        report["errors"] += warm_compile_caches(bench_flags, comparisons)
        report["tests"] = test_counts(started, time.perf_counter() - t0)
    compared = []
    for variants in comparisons:
        result, error = run_bench(bench_flags + [f"--compare={variants}"])
        if error:
            report["errors"].append(f"bench.py --compare={variants}: {error}")
        else:
            compared.append(result)
    if compared:
        report["training"] = training_figures(compared)
        report["goals"] = goals(report["training"])
    generation, error = run_bench(DRY_GENERATE if dry else GPU_GENERATE)
    if error:
        report["errors"].append(f"bench.py --generate: {error}")
    else:
        report["generation"] = {k: generation[k] for k in ("tokens_per_s", "decode_tokens_per_s", "prefill_s",
                                                            "peak_mem_mb")}
    if report["tests"]["failed"]:
        report["errors"].append(f"{report['tests']['failed']} GPU test(s) failed")
    report["seconds"] = time.perf_counter() - t0
    return report


def main(argv):
    args = parse_args(argv)
    import torch
    if not args["cpu_dry_run"] and not torch.cuda.is_available():
        print("error: CUDA is not available on this machine (the GPU check needs one GPU; --cpu_dry_run checks "
              "the script on the CPU)", file=sys.stderr)
        return 1
    report = check(args)
    with open(args["out"], "w") as f:
        json.dump(report, f, indent=1)
    print(summary(report))
    print(f"wrote {args['out']}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
