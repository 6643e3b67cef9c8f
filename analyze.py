"""
Find, plot and intervene on massive activations and attention sinks: the command line over sinkgpt.measure,
sinkgpt.probes and sinkgpt.report (tracking during training is sinkgpt.tracking). Every metric is defined in docs/sinks.md; the interventions follow L. Dial's GPT-2 bos_token study (2025),
Sun et al. (2024, massive activations), Yona et al. (2025, repeated tokens) and Guo et al. (2024, Bigram-Backcopy).

    python analyze.py out-shakespeare-char --report reports/char        # report.json, report.md and PNGs
    python analyze.py path/to/gpt2 --text FILE:prompt.txt --report reports/gpt2
    python analyze.py intervene out-bb/base --layer 1 --pos 0 --dim 17 --scale 0.5   # loss and sink masses move
    python analyze.py ablate out-bb/base                                 # zero vs mean ablation, val loss
    python analyze.py repeat out-bb/base --string a --n 64               # one token repeated, with/without BOS
    python analyze.py attribute out-bb/base --pos 0 --dim 17             # which MLP neurons write the entry
    python analyze.py ablate out-bb/base --heads 1.0,1.3                 # zero vs mean ablation of heads
    python analyze.py patch DIR --clean "..." --corrupt "..." --sites heads --metric loss --report R  # patching
    python analyze.py stream DIR --window 256 --keep 0,1,4 --report R   # perplexity with a rolling cache
    python analyze.py compare out-a out-b --report reports/ab            # metrics.jsonl of runs, overlaid
    python analyze.py explicit ORIGINAL CONVERTED --report R             # a model against its convert.py output
    python analyze.py starts data/models/SmolLM2-135M-Instruct           # each retrofit's step-0 loss change
    python analyze.py trajectory out-traj/bb --report reports/traj      # the massive entry over kept checkpoints
    python analyze.py trajectory EleutherAI/pythia-70m --revisions step0,step1000 --report R   # hub revisions

TARGET is a training out_dir (reads its ckpt.pt), a checkpoint file, or a pretrained folder (config.json and
model.safetensors). Data: --data DATASET (its val split), --text "..." or --text FILE:path, default the
target's own dataset. Bad input is one error line and exit code 1.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

from sinkgpt.checkpoint import load_model
from sinkgpt.common import InputError, plain
from sinkgpt.explicit import compare_explicit, explicit_markdown, paired_batches, parse_neurons, retrofit_start_costs
from sinkgpt.heads import (METRICS, SITE_POINTS, Metric, ablate_heads, activation_metric, parse_heads,
                           patch_heads_together, patch_map, patch_markdown)
from sinkgpt.pretrained import from_pretrained
from sinkgpt.measure import AnalyzeError
from sinkgpt.plots import plot_delta, plot_explicit, plot_patch_map, plot_repeat, plot_stream
from sinkgpt.probes import (POSITION_POINTS, ablate, attribute, check_position, encode_text, hook_name, intervene,
                            position_index, probe_batches, repeat_probe, stream_tokens)
from sinkgpt.report import build_report, compare, fmt, report_markdown, write_report
from sinkgpt.runtime import pick_device
from sinkgpt.streaming import stream_losses
from sinkgpt.tokenizer import load_tokenizer
from sinkgpt.trajectory import (TABLE_HEADER, measure_trajectory, parse_revisions, row_markdown, trajectory_points,
                                write_trajectory)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 1, like every other bad input
        raise AnalyzeError(message)


def add_target_args(p, data=True, target=True):
    if target:
        p.add_argument("target", help="a run folder (ckpt.pt), a checkpoint file, or a pretrained folder")
    if data:
        p.add_argument("--data", help="a prepared dataset name or 'bigram_backcopy' (val split); default: the "
                                      "target's own dataset")
        p.add_argument("--text", help="text to analyse, or FILE:path (tokenised with the target's tokenizer; "
                                      "the first block_size tokens)")
        p.add_argument("--batches", type=int, default=4, help="probe batches drawn from --data")
        p.add_argument("--batch_size", type=int, default=8)
        p.add_argument("--block_size", type=int, default=0,
                       help="sequence length (default: the model's context, at most 1024)")
        p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                       help="start each sequence with BOS (default: as trained; on for pretrained folders and "
                            "Bigram-Backcopy)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the model's weights (statistics are computed in float32 or float64 whatever it is)")
    p.add_argument("--report", help="folder for the JSON (and PNG) output")


def parse_args(argv):
    commands = ("report", "intervene", "ablate", "repeat", "attribute", "stream", "compare", "explicit", "starts",
                "patch", "trajectory")
    if argv and argv[0] not in commands and argv[0] not in ("-h", "--help"):
        argv = ["report"] + list(argv)
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("report", help="per-layer activations, sink masses, sink rate, plots")
    add_target_args(p)
    p.add_argument("--k", type=int, default=5, help="largest |h| entries kept per layer")
    p.add_argument("--min_ratio", type=float, default=100.0, help="ratio-only massive criterion (x median)")
    p = sub.add_parser("intervene", help="set / add to / scale one activation entry")
    add_target_args(p)
    p.add_argument("--hook", default="resid_post", help=f"embed, ln_f or one of {', '.join(POSITION_POINTS)}")
    p.add_argument("--layer", type=int)
    p.add_argument("--pos", type=int, default=0, help="real position (negative: sink tokens)")
    p.add_argument("--dim", type=int, required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--set", type=float)
    group.add_argument("--add", type=float)
    group.add_argument("--scale", type=float)
    p = sub.add_parser("ablate", help="zero vs mean ablation of massive activations (Sun et al.)")
    add_target_args(p)
    p.add_argument("--entry", action="append", default=[], metavar="LAYER:POS:DIM",
                   help="ablate this block-output entry (repeatable); default: the detected massive activations")
    p.add_argument("--min_ratio", type=float, default=100.0)
    p.add_argument("--heads", metavar="LAYER.HEAD,...",
                   help="ablate these heads' outputs instead (zero, and the mean over the probe sequences at each "
                        "position); the entries are read, not ablated")
    p = sub.add_parser("patch", help="activation patching: which heads, layers and positions carry a difference")
    add_target_args(p, data=False)
    p.add_argument("--clean", required=True, help="the clean prompt, or FILE:path")
    p.add_argument("--corrupt", required=True, help="the corrupt prompt, or FILE:path")
    p.add_argument("--bos", choices=("none", "clean", "corrupt", "both"), default="none",
                   help="which prompts start with the model's BOS token")
    p.add_argument("--repeat", type=int, default=1, help="each prompt's tokens repeated N times (' the' x 64)")
    p.add_argument("--align", type=int, default=0,
                   help="clean position i + ALIGN stands for corrupt position i (1: a BOS-first clean prompt "
                        "against the same text without BOS); the clean prompt is ALIGN tokens longer")
    p.add_argument("--sites", choices=tuple(SITE_POINTS), default="heads",
                   help="heads: each head's output (z, every position): a layer x head map; resid, attn, mlp: the "
                        "block input, attention output or MLP output at one position: a layer x position map")
    p.add_argument("--metric", choices=METRICS, default="loss")
    p.add_argument("--entry", metavar="LAYER:POS:DIM",
                   help="--metric entry: block LAYER's output at DIM, at corrupt position POS (P, A-B or all: the mean)")
    p.add_argument("--neuron", metavar="LAYER:POS:NEURON",
                   help="--metric neuron: MLP neuron NEURON of block LAYER (its activation), at corrupt position POS")
    p.add_argument("--heads", metavar="LAYER.HEAD,...",
                   help="instead of a map: patch these heads together in one run (and show an activation metric "
                        "at every position)")
    p.add_argument("--good", help="--metric logit_diff: text whose first token's logit counts +")
    p.add_argument("--bad", help="--metric logit_diff: text whose first token's logit counts -")
    p.add_argument("--batch_size", type=int, default=32, help="patched copies per forward pass")
    p = sub.add_parser("repeat", help="one token repeated N times, with and without BOS (Yona et al.)")
    add_target_args(p, data=False)
    p.add_argument("--token", type=int, help="token id to repeat")
    p.add_argument("--string", default=" the", help="text whose first token is repeated (when --token is not given)")
    p.add_argument("--n", type=int, default=64)
    p = sub.add_parser("attribute", help="which MLP neurons write residual dim D at position P")
    add_target_args(p)
    p.add_argument("--pos", type=int, default=0)
    p.add_argument("--dim", type=int, help="default: the top-1 entry of the layer with the largest ratio")
    p.add_argument("--top", type=int, default=10)
    p = sub.add_parser("stream", help="perplexity with a rolling cache: the first K tokens + W recent (StreamingLLM)")
    add_target_args(p)
    p.add_argument("--window", default="256", help="recent tokens kept, or a comma-separated grid (e.g. 64,256)")
    p.add_argument("--keep", default="0,1,4", help="first tokens kept (attention sinks): a grid, e.g. 0,1,4")
    p.add_argument("--tokens", type=int, default=2048, help="length of the streamed text")
    p = sub.add_parser("explicit", help="a model (BOS first) against its explicit-sink conversion (convert.py)")
    add_target_args(p)
    p.add_argument("converted", help="the converted model (convert.py's out_dir, or a run trained from it)")
    p.add_argument("--writers", default="", metavar="LAYER:NEURON,...",
                   help="MLP neurons to zero on the real tokens (default: the two that write BOS's largest entry)")
    p.add_argument("--window", type=int, default=64, help="streaming: recent tokens kept")
    p.add_argument("--tokens", type=int, default=1024, help="streaming: length of the streamed text")
    p.add_argument("--string", default=" the", help="repeated-token probe: text whose first token is repeated")
    p.add_argument("--n", type=int, default=128, help="repeated-token probe: length")
    p = sub.add_parser("starts", help="each sink retrofit of a pretrained folder: its loss change at step 0")
    add_target_args(p)
    p = sub.add_parser("trajectory", help="the massive entry, Sun et al. hits, sink rate and ablation cost over "
                                          "checkpoints or hub revisions")
    p.add_argument("targets", nargs="*", help="checkpoints, run folders (their kept ckpt_<iter>.pt, in step "
                                              "order), or one hub name with --revisions")
    add_target_args(p, target=False)
    p.add_argument("--revisions", help="comma-separated hub revisions of the hub name, e.g. step0,step1,step2")
    p = sub.add_parser("compare", help="runs' metrics.jsonl overlaid, and a table of final figures")
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    p.add_argument("--report", required=True)
    return parser.parse_args(argv)


def check_counts(args):
    for key in ("batches", "batch_size", "n", "k", "top", "tokens", "repeat"):
        if getattr(args, key, 1) is not None and getattr(args, key, 1) < 1:
            raise AnalyzeError(f"--{key} must be >= 1")


def write_json(out_dir, name, obj):
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(plain(obj), f, indent=1)


def cmd_report(args, model, batches, masks, source, tokenizer):
    report, maps = build_report(model, batches, masks, args.k, args.min_ratio, tokenizer)
    report = {"target": args.target, "data": source, **report}
    write_report(report, maps, args.report)
    print(report_markdown(report))
    print(f"wrote {args.report}/report.json, report.md, {', '.join(report['plots'])}")


def cmd_intervene(args, model, batches, masks, source):
    name = hook_name(args.hook, args.layer, model)
    mlp = model.transformer.h[0].mlp
    width = {"mlp_pre": mlp.c_fc.out_features, "mlp_post": mlp.c_proj.in_features}.get(args.hook, model.config.n_embd)
    if not 0 <= args.dim < width:
        raise AnalyzeError(f"--dim must be in [0, {width - 1}] at {args.hook}")
    check_position(args.pos, batches)
    op, value = next((op, v) for op, v in (("set", args.set), ("add", args.add), ("scale", args.scale)) if v is not None)
    result = intervene(model, batches, name, args.pos, args.dim, op, value, masks)
    print(f"{op} {name}[pos {args.pos}, dim {args.dim}] {'=' if op == 'set' else '+=' if op == 'add' else '*='} "
          f"{value:g}: loss {result['loss_before']:.4f} -> {result['loss_after']:.4f} ({result['delta_loss']:+.4f}); "
          f"sink rate {fmt(result['sink_rate_before'])}% -> {fmt(result['sink_rate_after'])}%")
    for layer, (b, a) in enumerate(zip(result["first_token_mass_before"], result["first_token_mass_after"])):
        print(f"layer {layer}: mass on pos 0 per head " + " ".join(f"{x:.3f}->{y:.3f}" for x, y in zip(b, a)))
    write_json(args.report, "intervene.json", {"target": args.target, "data": source, **result})
    if args.report:
        plot_delta(result["first_token_mass_before"], result["first_token_mass_after"],
                   os.path.join(args.report, "intervene.png"), f"change in mass on position 0 ({op} {value:g})")


def parse_entry(text, model):
    try:
        layer, pos, dim = (int(part) for part in text.split(":"))
    except ValueError:
        raise AnalyzeError(f"--entry {text!r} is not LAYER:POS:DIM") from None
    if not 0 <= layer < model.config.n_layer or not 0 <= dim < model.config.n_embd:
        raise AnalyzeError(f"--entry {text}: layer or dim out of range")
    return layer, pos, dim


def cmd_ablate(args, model, batches, masks, source):
    heads = parse_heads(args.heads, model.config) if args.heads is not None else None  # --heads '' is an error
    entries = [parse_entry(e, model) for e in args.entry]
    for _, pos, _ in entries:
        check_position(pos, batches)
        position_index(model, "resid_post", pos)
    if not entries:  # Sun et al. intervene where the massive activations first appear
        report, _ = build_report(model, batches, masks, 1, args.min_ratio)
        found = report["massive"] or report["massive_ratio_only"]
        if not found and not heads:
            raise AnalyzeError("no massive activation detected; name one with --entry LAYER:POS:DIM")
        first = min((m["layer"] for m in found), default=None)
        entries = [(m["layer"], m["position"], m["dim"]) for m in found if m["layer"] == first]
    if heads:
        return ablate_heads_report(args, model, batches, heads, entries, source)
    result = ablate(model, batches, entries, masks)
    print("ablated " + ", ".join(f"layer {e['layer']} pos {e['position']} dim {e['dim']} (mean {e['mean']:.4g})"
                                 for e in result["entries"]))
    print(f"loss: original {result['loss_none']:.4f}, zero {result['loss_zero']:.4f} ({result['delta_zero']:+.4f}), "
          f"mean {result['loss_mean']:.4f} ({result['delta_mean']:+.4f})")
    write_json(args.report, "ablate.json", {"target": args.target, "data": source, **result})


def ablate_heads_report(args, model, batches, heads, entries, source):
    indexed = [(layer, position_index(model, "resid_post", pos), dim) for layer, pos, dim in entries]
    result = ablate_heads(model, batches, heads, indexed)
    result["entries"] = [{"layer": layer, "position": pos, "dim": dim} for layer, pos, dim in entries]
    print(f"ablated heads {', '.join(result['heads'])}")
    print(f"loss: original {result['loss_none']:.4f}, zero {result['loss_zero']:.4f} ({result['delta_zero']:+.4f}), "
          f"mean {result['loss_mean']:.4f} ({result['delta_mean']:+.4f})")
    for i, (layer, pos, dim) in enumerate(entries):
        none, zero, mean = (result[f"entries_{mode}"][i] for mode in ("none", "zero", "mean"))
        print(f"block {layer} output, position {pos}, dim {dim} (mean over sequences): {none:.5g}; zero {zero:.5g} "
              f"({zero - none:+.5g}), mean {mean:.5g} ({mean - none:+.5g})")
    write_json(args.report, "ablate_heads.json", {"target": args.target, "data": source, **result})


def patch_prompts(args, target):
    """(clean ids (1, T + align), corrupt ids (1, T), the corrupt prompt's token strings)."""
    tokenizer = load_tokenizer(target.meta)
    device = target.model.lm_head.weight.device
    prompts = []
    for which in ("clean", "corrupt"):
        ids = encode_text(target.meta, getattr(args, which), False, f"--{which} text") * args.repeat
        bos = [target.meta["bos_token"]] if args.bos in (which, "both") else []
        n = len(bos + ids)
        if n > target.model.config.block_size:
            raise AnalyzeError(f"the --{which} prompt of {n} tokens is longer than the model's context "
                               f"{target.model.config.block_size}")
        if n < 2:
            raise AnalyzeError(f"the --{which} prompt gives {n} token{'s' * (n != 1)}: patching needs 2 or more")
        prompts.append(torch.tensor([bos + ids], device=device))
    return prompts[0], prompts[1], [tokenizer.decode([i]) for i in prompts[1][0].tolist()]


def first_token(target, text, flag):
    if text is None:
        raise AnalyzeError(f"--metric logit_diff needs {flag} TEXT (its first token)")
    ids = encode_text(target.meta, text, False, f"{flag} text")
    if not ids:
        raise AnalyzeError(f"{flag} {text!r} gives no token")
    return ids[0]


def cmd_patch(args, target):
    model = target.model
    clean, corrupt, labels = patch_prompts(args, target)
    if args.metric in ("entry", "neuron"):
        spec = getattr(args, args.metric)
        if spec is None:
            raise AnalyzeError(f"--metric {args.metric} needs --{args.metric} LAYER:POS:"
                               f"{'NEURON' if args.metric == 'neuron' else 'DIM'}")
        metric = activation_metric(args.metric, spec, model.config, corrupt.size(1))
    elif args.metric == "logit_diff":
        metric = Metric("logit_diff", good=first_token(target, args.good, "--good"),
                        bad=first_token(target, args.bad, "--bad"))
    else:
        metric = Metric("loss")
    if args.heads is not None:
        return patch_heads_report(args, model, clean, corrupt, metric)
    started = time.perf_counter()
    result = patch_map(model, clean, corrupt, args.sites, metric, args.align, args.batch_size)
    result.update(target=args.target, clean_tokens=clean.size(1), corrupt_tokens=corrupt.size(1),
                  corrupt_labels=labels, seconds=time.perf_counter() - started, threads=torch.get_num_threads())
    print(f"{result['metric']}: clean {result['clean']:.6g}, corrupt {result['corrupt']:.6g}; "
          f"{sum(map(len, result['recovery']))} sites patched in {result['seconds']:.1f} s ({result['threads']} threads)")
    ranked = sorted(((v, layer, i) for layer, row in enumerate(result["recovery"]) for i, v in enumerate(row)
                     if v is not None), reverse=True)
    if not ranked:
        print("the metric is the same on both runs: recovery is undefined")
    for v, layer, i in ranked[:8]:
        print(f"layer {layer} {result['columns']} {i}: recovery {v:+.3f}")
    if args.report:
        name = f"patch_{args.sites}"
        write_json(args.report, f"{name}.json", result)
        with open(os.path.join(args.report, f"{name}.md"), "w") as f:
            f.write(patch_markdown(result, labels))
        plot_patch_map(result, os.path.join(args.report, f"{name}.png"), labels)
        print(f"wrote {args.report}/{name}.json, {name}.md, {name}.png")


def patch_heads_report(args, model, clean, corrupt, metric):
    result = patch_heads_together(model, clean, corrupt, parse_heads(args.heads, model.config), metric, args.align)
    recovery = "undefined" if result["recovery"] is None else f"{result['recovery']:+.3f}"
    print(f"heads {', '.join(result['heads'])} patched together: {result['metric']}: clean {result['clean']:.6g}, "
          f"corrupt {result['corrupt']:.6g}, patched {result['patched']:.6g} (recovery {recovery})")
    if "profile" in result:
        for run, values in result["profile"].items():
            print(f"{run}, at each position: " + " ".join(f"{v:.4g}" for v in values))
    write_json(args.report, "patch_heads_together.json", {"target": args.target, **result})


def parse_grid(text, flag, least):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise AnalyzeError(f"--{flag} {text!r} is not a comma-separated list of integers") from None
    if min(values) < least:
        raise AnalyzeError(f"--{flag} values must be >= {least}, got {text}")
    return values


def cmd_stream(args, target, device):
    windows, keeps = parse_grid(args.window, "window", 1), parse_grid(args.keep, "keep", 0)
    ids, source = stream_tokens(target, device, data=args.data, text=args.text, n_tokens=args.tokens, seed=args.seed)
    rows = []
    for window in windows:
        for keep in keeps:
            try:
                result = stream_losses(target.model, ids, keep, window)
            except ValueError as e:
                raise AnalyzeError(str(e)) from None
            loss = result["losses"].mean().item()
            rows.append({"keep": keep, "window": window, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
                         "route": result["route"], "largest_cache": result["largest_cache"],
                         "tokens_per_s": result["tokens_per_s"], "losses": result["losses"].tolist()})
            print(f"keep {keep}, window {window}: loss {loss:.4f}, perplexity {rows[-1]['ppl']:.2f} "
                  f"({result['route']}, {result['tokens_per_s']:.1f} tokens/s)")
    write_json(args.report, "stream.json", {"target": args.target, "data": source, "rows": rows})
    if args.report:
        plot_stream(rows, os.path.join(args.report, "stream.png"))


def cmd_repeat(args, model, meta):
    token = args.token
    if token is None:
        try:
            ids = load_tokenizer(meta).encode(args.string)
        except ValueError as e:
            raise AnalyzeError(str(e)) from None
        if not ids:
            raise AnalyzeError("--string gives no token")
        token = ids[0]
    if not 0 <= token < model.config.vocab_size:
        raise AnalyzeError(f"--token {token} is outside the vocabulary of {model.config.vocab_size}")
    result = repeat_probe(model, token, args.n, meta.get("bos_token", model.config.bos_token))
    for variant, layers in result["variants"].items():
        for e in layers:
            norms = e["resid_norm"]
            print(f"{variant} layer {e['layer']}: resid norm pos 0 {norms[0]:.3g}, later max {max(norms[1:] or [0]):.3g};"
                  f" mass on pos 0 {e['mass_pos0']:.3f}, most on a later position {fmt(e['later_max'])} "
                  f"(pos {e['later_max_pos']})" + (f", slot {e['slot_mass']:.3f}" if e["slot_mass"] is not None else ""))
    write_json(args.report, "repeat.json", {"target": args.target, **result})
    if args.report:
        plot_repeat(result, os.path.join(args.report, "repeat.png"))


def cmd_attribute(args, model, batches, masks, source):
    dim = args.dim
    if dim is None:
        report, _ = build_report(model, batches, masks, 1)
        layer = report["layers"][report["max_ratio"]["layer"]]
        args.pos, dim = layer["top"][0][1], layer["top"][0][2]
    if not 0 <= dim < model.config.n_embd:
        raise AnalyzeError(f"--dim must be in [0, {model.config.n_embd - 1}]")
    position_index(model, "resid_post", args.pos)
    check_position(args.pos, batches)
    result = attribute(model, batches, args.pos, dim, args.top)
    print(f"residual dim {dim} at position {args.pos} (mean over sequences); embedding {fmt(result['embed'])}")
    for e in result["layers"]:
        neurons = ", ".join(f"n{n}: {a:.3g} x {w:.3g} = {c:.4g}" for n, a, w, c in e["neurons"][:3])
        print(f"layer {e['layer']}: attn {e['attn']:+.4g}, mlp {e['mlp']:+.4g} (bias {e['bias']:+.3g}), "
              f"block output {e['resid_post']:.4g}; top neurons {neurons}")
    write_json(args.report, "attribute.json", {"target": args.target, "data": source, **result})


def bos_writers(model, batches, top=2):
    """The MLP neurons that write BOS's largest block-output entry: in the first block where the entry reaches
    half its largest value, the `top` neurons with the largest activation x output weight at position 0."""
    names = [f"h.{layer}.resid_post" for layer in range(model.config.n_layer)]
    _, _, got = model.run_with_cache(batches[0][0][:1], names)
    at_bos = torch.stack([got[n][0, 0].float().abs() for n in names])  # (L, C)
    dim = int(at_bos.amax(0).argmax())
    layer = int((at_bos[:, dim] >= at_bos[:, dim].max() / 2).nonzero()[0])
    neurons = attribute(model, batches[:1], 0, dim, top)["layers"][layer]["neurons"]
    return [(layer, n[0]) for n in neurons]


def cmd_explicit(args, target, device):
    converted = load_model(args.converted, device)
    original = target.model
    if converted.model.config.pos_offset != 1 or converted.model.config.sink != "kv_bias":
        raise AnalyzeError(f"{args.converted} is not a model whose BOS became a slot (convert.py writes one)")
    if target.model.config.pos_offset or target.meta.get("bos_token") is None:
        raise AnalyzeError(f"{args.target} is not a model that reads BOS first")
    if converted.model.config.vocab_size != original.config.vocab_size:
        raise AnalyzeError(f"{args.converted} and {args.target} have different vocabularies")
    batches, _, source = probe_batches(target, device, data=args.data, text=args.text, batches=args.batches,
                                       batch_size=args.batch_size, block_size=args.block_size, bos=False,
                                       seed=args.seed)
    windows = real_windows(target, batches)[:, :converted.model.config.block_size + 1]
    bos_token = target.meta["bos_token"]
    source["windows_without_bos"] = len(windows)
    try:
        writers = parse_neurons(args.writers, original.config, "--writers")
    except ValueError as e:
        raise AnalyzeError(str(e)) from None
    writers = writers or bos_writers(original, [paired_batches(windows, bos_token)[0]])
    ids, _ = stream_tokens(target, device, data=args.data, text=args.text, n_tokens=args.tokens, seed=args.seed)
    if args.window + 1 > min(original.config.block_size, converted.model.config.block_size):
        raise AnalyzeError(f"--window {args.window} does not fit the models' context")
    try:
        token = load_tokenizer(target.meta).encode(args.string)[0]
    except (ValueError, IndexError):
        raise AnalyzeError(f"--string {args.string!r} gives no token") from None
    result = compare_explicit(original, converted.model, windows, bos_token, writers, ids, args.window, token,
                              min(args.n, converted.model.config.block_size))
    result = {"original": args.target, "converted": args.converted, "data": source, **result}
    text = explicit_markdown(result)
    print(text, end="")
    write_json(args.report, "explicit.json", result)
    if args.report:
        with open(os.path.join(args.report, "explicit.md"), "w") as f:
            f.write(f"# {args.target} against {args.converted}\n\n{text}")
        plot_explicit(result, os.path.join(args.report, "explicit.png"))
        print(f"wrote {args.report}/explicit.json, explicit.md, explicit.png")


def real_windows(target, batches):
    """(N, T + 1) real-token windows from probe batches read without BOS; windows holding a BOS (a document start,
    where the model builds its sink again) are left out."""
    windows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in batches])
    windows = windows[~(windows == target.meta["bos_token"]).any(1)]
    if len(windows) == 0:
        raise AnalyzeError("every probe window holds a BOS token (a document start): give shorter --block_size, "
                           "more --batches or --text")
    return windows


def cmd_starts(args, target, device):
    if target.kind != "pretrained":
        raise AnalyzeError(f"{args.target} is not a pretrained folder: retrofits start from one")
    batches, _, source = probe_batches(target, device, data=args.data, text=args.text, batches=args.batches,
                                       batch_size=args.batch_size, block_size=args.block_size, bos=False,
                                       seed=args.seed)
    windows = real_windows(target, batches)[:, :target.model.config.block_size]
    result = retrofit_start_costs(lambda **options: from_pretrained(args.target, **options).to(device), windows,
                                  target.meta["bos_token"])
    print(f"plain, BOS first: loss {result['plain_loss']:.4f} on {len(windows)} windows of {windows.size(1) - 1} "
          "real tokens (the prediction at BOS left out)")
    for name, change in result["loss_change"].items():
        print(f"{name}: {change:+.4f}")
    write_json(args.report, "starts.json", {"target": args.target, "data": source, "windows": list(windows.shape),
                                            **result})


def cmd_trajectory(args, device):
    if not args.report:
        raise AnalyzeError("give --report DIR for the trajectory files")
    points = trajectory_points(args.targets, parse_revisions(args.revisions))
    probe = dict(data=args.data, text=args.text, batches=args.batches, batch_size=args.batch_size,
                 block_size=args.block_size, bos=args.bos, seed=args.seed)
    rows = []

    def on_row(row):
        if not rows:  # the header comes with the first row: a first point that fails prints only its error
            print(TABLE_HEADER)
        rows.append(row)
        print(row_markdown(row), flush=True)

    try:
        measure_trajectory(points, device, getattr(torch, args.dtype), probe, on_row)
    except InputError as e:  # a point that fails to load or to probe: keep the points measured before it
        failed = points[len(rows)].label
        message = str(e) if failed in str(e) else f"{failed}: {e}"
        if rows:
            write_trajectory(rows, args.report)
            message += f" (the {len(rows)} points before it are in {args.report}/trajectory.md)"
        raise AnalyzeError(message) from None
    write_trajectory(rows, args.report)
    print(f"wrote {args.report}/trajectory.md, trajectory.json, trajectory.png")


def check_report_dir(report):
    """Make --report's folder before any work, so a bad path fails first, not after the analysis."""
    if report:
        try:
            os.makedirs(report, exist_ok=True)
        except OSError as e:
            raise AnalyzeError(f"--report {report}: cannot create the folder ({e.strerror})") from None


def run(argv):
    args = parse_args(argv)
    check_counts(args)
    check_report_dir(getattr(args, "report", None))
    if args.command == "compare":
        print(compare(args.runs, args.report), end="")
        print(f"wrote {args.report}/compare.md, compare.json, compare.png")
        return
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if args.command == "trajectory":
        return cmd_trajectory(args, device)
    if args.command == "report" and not args.report:
        raise AnalyzeError("give --report DIR for the report files")
    target = load_model(args.target, device, getattr(torch, args.dtype))
    model = target.model
    if args.command == "repeat":
        return cmd_repeat(args, model, target.meta)
    if args.command == "stream":
        return cmd_stream(args, target, device)
    if args.command == "explicit":
        return cmd_explicit(args, target, device)
    if args.command == "starts":
        return cmd_starts(args, target, device)
    if args.command == "patch":
        return cmd_patch(args, target)
    batches, masks, source = probe_batches(target, device, data=args.data, text=args.text, batches=args.batches,
                                           batch_size=args.batch_size, block_size=args.block_size, bos=args.bos,
                                           seed=args.seed)
    if args.command == "report":  # names the token at each top entry
        return cmd_report(args, model, batches, masks, source, load_tokenizer(target.meta))
    commands = {"intervene": cmd_intervene, "ablate": cmd_ablate, "attribute": cmd_attribute}
    commands[args.command](args, model, batches, masks, source)


def main(argv):
    try:
        run(argv)
    except InputError as e:  # bad arguments, target, data; a device this machine does not have
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
