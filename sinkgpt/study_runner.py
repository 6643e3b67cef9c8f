"""
The study runner: trains a baseline and every variant of a study config on the same data, token budget and
seeds (one train.py process each, resumable), then writes one report (table + overlaid curves) from the finished
runs. study.py is its command line.

A study config is plain Python assignments (STUDY_DEFAULTS's keys). Runs go to out_root/<variant>/seed<N>; a run
that finished is skipped, one with a checkpoint resumes, so an interrupted study picks up where it stopped.

May import: sinkgpt.checkpoint, sinkgpt.common, sinkgpt.config, sinkgpt.measure, sinkgpt.probes,
sinkgpt.quantize, sinkgpt.report, sinkgpt.runtime, sinkgpt.stats, sinkgpt.streaming, sinkgpt.tokenizer.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import torch

from sinkgpt.checkpoint import load_model, read_metrics
from sinkgpt.common import InputError, plain
from sinkgpt.config import read_config_file
from sinkgpt.measure import collect
from sinkgpt.probes import DEFAULT_MAX_LENGTH, ablate, probe_batches, repeat_probe, stream_tokens
from sinkgpt.quantize import ptq_losses
from sinkgpt.report import compare
from sinkgpt.runtime import pick_device
from sinkgpt.stats import largest_ratio_layer, sun_massive
from sinkgpt.streaming import stream_losses
from sinkgpt.tokenizer import load_tokenizer

STUDY_DEFAULTS = dict(
    base="config/bb/base.py",  # the train.py config every variant starts from
    overrides={},  # train.py keys applied to every run (token budget, tracking, ...)
    variants={"baseline": {}},  # name -> train.py keys that make the variant
    seeds=[1337, 1338],
    out_root="out-study",
    report_dir="out-study/report",
    probe_batches=4,  # val batches the final analysis averages over
    probe_batch_size=16,
    probe_block_size=0,  # tokens per probe sequence; 0 = the model's context, at most 1024
    repeat_n=64,  # repeated-token probe length
    repeat_text="a",  # the token repeated (encoded with the run's tokenizer, first token taken)
    stream_tokens=512,  # streaming evaluation: the length of the streamed val text
    stream_window=32,  # ... the recent tokens kept; the first 0 or 1 are kept besides (attention sinks)
    # [layer, position, dim] of the block output whose zero- and mean-ablation every run measures (e.g. a
    # pretrained model's massive activation, the same entry for every variant); [] = each run's own largest
    # top-1/median entry
    massive_entry=[],
    device="auto",  # where the final analysis runs (auto: cuda, then mps, then cpu); its statistics are float32
    threads=0,  # OMP_NUM_THREADS of each training process; 0 = inherit (1 when other work shares a 2-core CPU)
    # a model (pretrained folder or checkpoint) every run started from, analysed like the runs on the first run's
    # data as the table's first row; its val loss is the first run's step-0 evaluation. "" = none
    reference="",
)


class StudyError(InputError):
    """A bad study config, or a run of it that failed."""


def load_study(path):
    study = dict(STUDY_DEFAULTS)
    for key, value in read_config_file(path).items():
        if key not in STUDY_DEFAULTS:
            raise StudyError(f"unknown study key '{key}' in {path} (keys: {', '.join(STUDY_DEFAULTS)})")
        if type(value) is not type(STUDY_DEFAULTS[key]):
            raise StudyError(f"study key '{key}' in {path} must be {type(STUDY_DEFAULTS[key]).__name__}")
        study[key] = value
    for key in ("threads", "probe_block_size"):
        if study[key] < 0:
            raise StudyError(f"study key '{key}' in {path} must be >= 0, got {study[key]}")
    entry = study["massive_entry"]
    if entry and (len(entry) != 3 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in entry)):
        raise StudyError(f"study key 'massive_entry' in {path} must be [layer, position, dim] (ints >= 0) or [], "
                         f"got {entry!r}")
    if study["reference"] and "start" in study["variants"]:
        raise StudyError(f"{path}: the variant name 'start' is the reference row's; rename the variant")
    if not study["seeds"] or not study["variants"]:
        raise StudyError(f"{path}: a study needs at least one seed and one variant")
    for name, keys in study["variants"].items():
        if not isinstance(keys, dict):
            raise StudyError(f"variant {name!r} in {path} must be a dict of train.py keys, got {keys!r}")
    return study


def flag(key, value):
    return f"--{key}={value!r}" if isinstance(value, (str, list, dict)) else f"--{key}={value}"


def run_dir(study, variant, seed):
    return os.path.join(study["out_root"], variant, f"seed{seed}")


def train_command(study, variant, seed, resume):
    out_dir = run_dir(study, variant, seed)
    keys = dict(study["overrides"], **study["variants"][variant], seed=seed, out_dir=out_dir)
    if resume:
        keys["init_from"] = "resume"
        stopped = os.path.join(out_dir, "ckpt_stop.pt")  # a stop signal's state, newer than the best-val ckpt.pt
        if os.path.isfile(stopped):
            keys["resume_from"] = stopped
    return [sys.executable, "train.py", study["base"]] + [flag(k, v) for k, v in keys.items()]


def run_status(out_dir):
    """'done', 'partial' (a checkpoint to resume from) or 'new'."""
    config_path, metrics_path = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "metrics.jsonl")
    if os.path.isfile(config_path) and os.path.isfile(metrics_path):
        with open(config_path) as f:
            max_iters = json.load(f)["max_iters"]
        evals = [e for e in read_metrics(metrics_path) if "val_loss" in e]
        if any(e.get("iter") == max_iters for e in evals) and os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
            return "done"
    held = any(os.path.isfile(os.path.join(out_dir, name)) for name in ("ckpt.pt", "ckpt_stop.pt"))
    return "partial" if held else "new"


def run_training(cmd, threads=0):
    """Run one train.py and return its exit code. A terminal's Ctrl-C reaches the run as well as the study: the
    study ignores it while the run saves its checkpoint and exits with 130, instead of killing it mid-save."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads > 0 else None
    proc = subprocess.Popen(cmd, env=env)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def train_all(study, dry_run=False, only=None):
    """Train (or resume) every variant x seed, or only the variants named in `only`."""
    unknown = [v for v in only or [] if v not in study["variants"]]
    if unknown:
        raise StudyError(f"--only: {unknown[0]!r} is not a variant ({', '.join(study['variants'])})")
    for seed in study["seeds"]:  # seed-major: a study stopped half-way has every variant at the first seed
        for variant in [v for v in study["variants"] if only is None or v in only]:
            out_dir = run_dir(study, variant, seed)
            status = run_status(out_dir)
            if status == "done":
                continue
            if status == "new" and os.path.isdir(out_dir):
                shutil.rmtree(out_dir)  # logs of a run that never checkpointed
            cmd = train_command(study, variant, seed, resume=status == "partial")
            print(("would run: " if dry_run else f"[{variant} seed {seed}] ") + " ".join(cmd), flush=True)
            if dry_run:
                continue
            t0 = time.time()
            code = run_training(cmd, study["threads"])
            if code == 130:  # stopped by Ctrl-C / SIGTERM after saving its checkpoint
                raise KeyboardInterrupt
            if code != 0:
                raise StudyError(f"training {variant} seed {seed} failed; fix it and rerun to resume")
            times_path = os.path.join(out_dir, "study_time.json")
            previous = json.load(open(times_path))["seconds"] if os.path.isfile(times_path) else 0.0
            with open(times_path, "w") as f:
                json.dump({"seconds": previous + time.time() - t0}, f)


# ----------------------------------------------------------------------------------------------------
# analysis of the finished runs


ANALYSIS_VERSION = 3  # bump when analyse_target's figures change: cached analyses of older code are redone
PROBE_KEYS = ("probe_batches", "probe_batch_size", "probe_block_size", "repeat_n", "repeat_text", "stream_tokens",
              "stream_window", "massive_entry", "device")


def analyse_run(study, out_dir):
    """analyse_target on a finished run, cached in out_dir/study_analysis.json for the same checkpoint, metrics
    and probe settings: a report rebuilt later (or by a --report_only while other runs still train) reuses it."""
    def stat(name):
        info = os.stat(os.path.join(out_dir, name))
        return [info.st_size, info.st_mtime_ns]
    key = plain({"version": ANALYSIS_VERSION, "ckpt": stat("ckpt.pt"), "metrics": stat("metrics.jsonl"),
                 **{k: study[k] for k in PROBE_KEYS}})
    path = os.path.join(out_dir, "study_analysis.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["row"]
    row = plain(analyse_target(study, load_model(out_dir, analysis_device(study)), read_metrics(out_dir)))
    with open(path + ".tmp", "w") as f:
        json.dump({"key": key, "row": row}, f)
    os.replace(path + ".tmp", path)
    return row


def analyse_reference(study, first_run):
    """The model the runs started from (study key 'reference'), probed exactly as that run: its data, BOS rule,
    seed and context; its val loss the run's step-0 evaluation. The table's starting row."""
    device = analysis_device(study)
    run = load_model(first_run, device)
    reference = replace(load_model(study["reference"], device), config=run.config, bos=run.bos)
    start = [e for e in read_metrics(first_run) if e.get("val_loss") is not None and e.get("iter") == 0]
    return analyse_target(study, reference, start, context=run.model.config.block_size)


def analysis_device(study):
    return pick_device(study["device"])


def analyse_target(study, target, events, context=None):
    """The final figures of one model (probed on target.config's data, from its seed): val loss (the last
    evaluation in events), the massive activation (where, how large, what zeroing it or setting it to its mean
    costs), sink rates, BB masses, the repeated-token probe with and without a leading BOS, outliers, simulated
    quantization and streaming. `context` caps every probe's length (default: the model's block size)."""
    model, meta, cfg = target.model, target.meta, target.config
    device = str(model.lm_head.weight.device)  # the probes go where the model is
    context = context or model.config.block_size
    seed = cfg.get("seed", 1337) + 99
    length = min(study["probe_block_size"] or DEFAULT_MAX_LENGTH, context)
    batches, masks, _ = probe_batches(target, device, batches=study["probe_batches"],
                                      batch_size=study["probe_batch_size"], block_size=length, seed=seed)
    entry = study["massive_entry"]
    if entry and (entry[0] >= model.config.n_layer or entry[1] >= batches[0][0].size(1)
                  or entry[2] >= model.config.n_embd):
        raise StudyError(f"massive_entry {entry} is outside the probes ({model.config.n_layer} layers, "
                         f"{batches[0][0].size(1)} positions, {model.config.n_embd} dims)")
    with torch.no_grad():
        stats = collect(model, batches, masks)
    best = stats["layers"][largest_ratio_layer(stats["layers"])]
    entry = entry or [best["layer"]] + list(best["top"][0][1:])
    ablated = ablate(model, batches, [tuple(entry)], masks)
    quantized = ptq_losses(model, batches)
    ids, _ = stream_tokens(target, device, n_tokens=study["stream_tokens"], seed=seed)
    window = min(study["stream_window"], context - 1)
    streamed = {keep: stream_losses(model, ids, keep, window)["losses"].mean().item() for keep in (0, 1)}
    token = load_tokenizer(meta).encode(study["repeat_text"])[0]
    repeats = repeat_probe(model, token, min(study["repeat_n"], context), meta["bos_token"])["variants"]
    repeat, repeat_bos = repeats["no_bos"], repeats["bos"]
    evals = [e for e in events if e.get("val_loss") is not None]
    row = {
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_backcopy_loss": evals[-1].get("val_backcopy_loss") if evals else None,
        "probe_loss": stats["loss"], "probe_tokens": batches[0][0].size(1),
        # the layer with the largest top-1/median ratio, and its top-1 entry
        "max_ratio": best["ratio"], "max_ratio_at": [best["layer"]] + list(best["top"][0][1:]),
        "top1_at_max_ratio": best["top"][0][0],
        "sun_layers": [layer["layer"] for layer in stats["layers"] if sun_massive(layer)],
        "massive_entry": entry, "ablate_mean_value": ablated["entries"][0]["mean"],
        "ablate_delta_zero": ablated["delta_zero"], "ablate_delta_mean": ablated["delta_mean"],
        "sink_rate": stats["sink_rate"], "slot_sink_rate": stats["slot_sink_rate"],
        "first_mass": [layer["first_token_mass_mean"] for layer in stats["layers"]],
        "slot_mass": [layer["slot_mass_mean"] for layer in stats["layers"]],
        "pos0_norm_ratio": [layer["pos0_norm_ratio"] for layer in stats["layers"]],
        "repeat_later_max": max(layer["later_max"] for layer in repeat),
        "repeat_pos0": sum(layer["mass_pos0"] for layer in repeat) / len(repeat),
        "repeat_later_max_bos": max(layer["later_max"] for layer in repeat_bos),
        **{f"outlier_{key}": value for key, value in stats["outliers"].items()},
        "delta_w8a8": quantized["delta_w8a8"], "delta_w4": quantized["delta_w4"],
        "stream_window": window, "stream_ppl_keep0": math.exp(streamed[0]), "stream_ppl_keep1": math.exp(streamed[1]),
    }
    if masks is not None:
        row["bb"] = [{k: layer["bb"][k] for k in ("dormant_bos", "active_bos", "dormant_slot", "value_ratio",
                                                   "resid_ratio") if k in layer["bb"]} for layer in stats["layers"]]
    peak = [e for e in events if "track_first_mass" in e]
    if peak:  # transient sinks: the figure at its peak as well as at the end
        row["peak_first_mass"] = max(max(v for v in e["track_first_mass"] if v is not None) for e in peak)
    return row


def mean_spread(values):
    """(mean, sample standard deviation with n - 1) over the seeds' finite values; one seed has no spread."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_spread(mean_sd, digits=3):
    mean, sd = mean_sd
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


# the figures of a run that an option which changes nothing leaves exactly as the baseline's
NULL_KEYS = ("val_loss", "probe_loss", "top1_at_max_ratio", "sink_rate", "ablate_delta_zero", "delta_w8a8")


def null_variants(rows_by_variant, baseline):
    """Variants whose every run equals the baseline's on every NULL_KEYS figure, to the last digit: the option
    did not change training (a start that cannot move, a parameter outside the optimizer), a null result."""
    if baseline not in rows_by_variant:
        return []
    reference = [[r.get(k) for k in NULL_KEYS] for r in rows_by_variant[baseline]]
    return [v for v, rows in rows_by_variant.items() if v not in (baseline, "start")
            and [[r.get(k) for k in NULL_KEYS] for r in rows] == reference]


def summary_table(rows_by_variant, null=()):
    lines = ["| variant | val loss | back-copy loss | max top-1/median (layer, pos, dim) | % heads on pos 0 "
             "(alpha>0.3) | % heads on slot | peak mass on pos 0 | repeated-token: max later-key mass | "
             "minutes of training per run |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, rows in rows_by_variant.items():
        where = rows[0]["max_ratio_at"]
        lines.append(" | ".join([
            f"| {variant}" + (" (null: equals the baseline)" if variant in null else ""),
            fmt_spread(mean_spread([r["val_loss"] for r in rows]), 4),
            fmt_spread(mean_spread([r["val_backcopy_loss"] for r in rows]), 4),
            f"{fmt_spread(mean_spread([r['max_ratio'] for r in rows]), 1)} ({', '.join(map(str, where))})",
            fmt_spread(mean_spread([r["sink_rate"] for r in rows]), 1),  # analyze reports these in percent
            fmt_spread(mean_spread([r["slot_sink_rate"] for r in rows]), 1),
            fmt_spread(mean_spread([r.get("peak_first_mass") for r in rows]), 2),
            fmt_spread(mean_spread([r["repeat_later_max"] for r in rows]), 2),
            fmt_spread(mean_spread([r.get("train_minutes") for r in rows]), 1)]) + " |")
    return "\n".join(lines) + "\n"


def outlier_table(rows_by_variant):
    """What a dedicated sink should buy (Bondarenko et al., StreamingLLM): the outliers, the loss cost of
    simulated quantization, and the perplexity of streaming with a rolling cache with and without the first
    token kept."""
    if "delta_w8a8" not in next(iter(rows_by_variant.values()))[0]:
        return ""
    window = next(iter(rows_by_variant.values()))[0]["stream_window"]
    lines = ["| variant | block output max \\|h\\| | kurtosis | attention output max \\|x\\| | attention kurtosis "
             "| W8A8 loss change | W4 loss change | streaming ppl, window only | + first token kept |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, rows in rows_by_variant.items():
        def col(key, digits=1):
            return fmt_spread(mean_spread([r[key] for r in rows]), digits)
        lines.append(f"| {variant} | {col('outlier_resid_max_abs')} | {col('outlier_resid_kurtosis')} | "
                     f"{col('outlier_attn_max_abs', 2)} | {col('outlier_attn_kurtosis')} | {col('delta_w8a8', 4)} | "
                     f"{col('delta_w4', 4)} | {col('stream_ppl_keep0', 3)} | {col('stream_ppl_keep1', 3)} |")
    return f"Streaming window: {window} recent tokens.\n\n" + "\n".join(lines) + "\n"


def layer_ranges(layers):
    """[3, 4, 5, 9] -> '3-5, 9'."""
    runs = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def massive_table(rows_by_variant):
    """The massive activation of each variant and what the model still needs it for (Sun et al.): zeroing the
    entry against setting it to its mean; the repeated-token probe with and without a leading BOS."""
    lines = ["| variant | largest top-1 \\|h\\| (at the largest ratio) | layers meeting Sun et al. | ablated entry "
             "(layer, pos, dim) | its mean | loss change, zeroed | loss change, set to mean | repeated token, "
             "max later-key mass: no BOS / BOS first |", "|---|---|---|---|---|---|---|---|"]
    for variant, rows in rows_by_variant.items():
        def col(key, digits=3):
            return fmt_spread(mean_spread([r[key] for r in rows]), digits)
        suns = sorted({len(r["sun_layers"]) for r in rows})
        where = f"{len(rows[0]['sun_layers'])} ({layer_ranges(rows[0]['sun_layers'])})" if rows[0]["sun_layers"] else "0"
        lines.append(f"| {variant} | {col('top1_at_max_ratio', 1)} | {where if len(suns) == 1 else '/'.join(map(str, suns))} | "
                     f"{', '.join(map(str, rows[0]['massive_entry']))} | {col('ablate_mean_value', 1)} | "
                     f"{col('ablate_delta_zero')} | {col('ablate_delta_mean')} | "
                     f"{col('repeat_later_max', 2)} / {col('repeat_later_max_bos', 2)} |")
    return "\n".join(lines) + "\n"


def bb_table(rows_by_variant):
    """Per layer, seed-averaged: dormant (non-trigger) vs active attention on BOS, on the slot, value drain."""
    lines = ["| variant | layer | non-trigger -> BOS | trigger -> BOS | non-trigger -> slot | BOS value / others "
             "| BOS residual / others |", "|---|---|---|---|---|---|---|"]
    for variant, rows in rows_by_variant.items():
        if "bb" not in rows[0]:
            return ""
        for layer in range(len(rows[0]["bb"])):
            def col(key):
                vals = [r["bb"][layer].get(key) for r in rows]
                vals = [sum(v) / len(v) if isinstance(v, list) else v for v in vals if v is not None]
                return fmt_spread(mean_spread(vals), 2)
            lines.append(f"| {variant} | {layer} | {col('dormant_bos')} | {col('active_bos')} | "
                         f"{col('dormant_slot')} | {col('value_ratio')} | {col('resid_ratio')} |")
    return "\n".join(lines) + "\n"


def write_report(study, config_path):
    rows_by_variant, seconds = {}, 0.0
    for variant in study["variants"]:
        rows = []
        for seed in study["seeds"]:
            out_dir = run_dir(study, variant, seed)
            if run_status(out_dir) != "done":
                continue
            rows.append(analyse_run(study, out_dir))
            times_path = os.path.join(out_dir, "study_time.json")
            run_seconds = json.load(open(times_path))["seconds"] if os.path.isfile(times_path) else None
            rows[-1]["train_minutes"] = None if run_seconds is None else run_seconds / 60
            seconds += run_seconds or 0.0
        if rows:
            rows_by_variant[variant] = rows
    if not rows_by_variant:
        raise StudyError("no finished runs to report on yet")
    if study["reference"]:  # where every run started, first; probed as the baseline run (else the first run)
        probed_as = "baseline" if "baseline" in rows_by_variant else next(iter(rows_by_variant))
        first = run_dir(study, probed_as, study["seeds"][0])
        rows_by_variant = {"start": [analyse_reference(study, first)], **rows_by_variant}
    report_dir = study["report_dir"]
    os.makedirs(report_dir, exist_ok=True)
    trained = [v for v in rows_by_variant if v in study["variants"]]  # the reference row has no curves
    curves_dir = os.path.join(report_dir, "curves")
    compare([run_dir(study, v, study["seeds"][0]) for v in trained], curves_dir, names=trained)
    baseline = "baseline" if "baseline" in rows_by_variant else trained[0]
    null = null_variants(rows_by_variant, baseline)
    table, bb = summary_table(rows_by_variant, null), bb_table(rows_by_variant)
    seeds = ", ".join(map(str, study["seeds"]))
    text = (f"# Study: {config_path}\n\nVariants x seeds ({seeds}) trained with `python study.py {config_path}` "
            f"(base config `{study['base']}`, overrides `{study['overrides']}`); {sum(len(rows_by_variant[v]) for v in trained)}"
            f" runs, {seconds / 60:.1f} minutes of training in all."
            + (" Mean ± sample sd (n - 1) over seeds." if len(study["seeds"]) > 1 else "") + f"\n\n{table}\n")
    if null:
        text += (f"**Null variants**: {', '.join(null)} equal {baseline} on every figure ({', '.join(NULL_KEYS)}) to "
                 "the last digit: the option changed nothing in training. Not a finding.\n\n")
    text += f"## The massive activation\n\n{massive_table(rows_by_variant)}\n"
    if bb:
        text += f"## Bigram-Backcopy, per layer\n\n{bb}\n"
    outliers = outlier_table(rows_by_variant)
    if outliers:
        text += f"## Outliers, quantization and streaming\n\n{outliers}\n"
    text += "## Curves (first seed)\n\n![curves](curves/compare.png)\n"
    with open(os.path.join(report_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(report_dir, "results.json"), "w") as f:
        json.dump(plain({"study": study, "rows": rows_by_variant, "train_seconds": seconds}), f, indent=1)
    print(text)
    return text
