"""
Reports: the per-layer analysis report (report.json, report.md and its plots) and the comparison of runs
from their metrics.jsonl (compare.md, compare.json, compare.png).

May import: sinkgpt.checkpoint, sinkgpt.common, sinkgpt.measure, sinkgpt.plots, sinkgpt.quantize, sinkgpt.stats.
"""

import json
import math
import os

from sinkgpt.checkpoint import read_metrics
from sinkgpt.common import plain
from sinkgpt.measure import collect
from sinkgpt.plots import plot_activation_map, plot_activations, plot_bb, plot_compare, plot_masses, plot_pushes
from sinkgpt.quantize import ptq_losses
from sinkgpt.stats import (MASSIVE_ABS, MASSIVE_RATIO, SINK_EPS, SINK_T, find_massive, finite_max, finite_mean,
                           largest_ratio_layer, sun_massive)


def build_report(model, batches, masks=None, k=5, min_ratio=100.0, tokenizer=None, quantization=True):
    """report.json's content (and the (T, C) |h| maps for the plots). With the model's tokenizer each top entry
    is named by its input token's text too (top_token_text). quantization=False leaves out the simulated
    quantization (several more passes), for measurements that do not report it."""
    stats = collect(model, batches, masks, k)
    if tokenizer is not None:
        for layer in stats["layers"]:
            layer["top_token_text"] = [tokenizer.decode([token]) for token in layer["top_tokens"]]
    maps, medians = stats.pop("maps"), stats.pop("medians")
    ratios = [layer["ratio"] for layer in stats["layers"]]
    for layer in stats["layers"]:
        layer["sun_massive"] = sun_massive(layer)
    best = largest_ratio_layer(stats["layers"])
    report = {
        "model": model.config.to_dict(), "n_prefix": model.n_prefix, "n_slot_columns": model.n_slot_columns,
        **stats,
        "sink_rate_eps": SINK_EPS, "sink_rate_T": SINK_T,
        "max_ratio": {"layer": best, "ratio": ratios[best], "top": stats["layers"][best]["top"][0],
                      "token": stats["layers"][best].get("top_token_text", stats["layers"][best]["top_tokens"])[0]},
        "massive_criteria": {"sun": f"|h| > {MASSIVE_ABS:g} and >= {MASSIVE_RATIO:g} x median",
                             "ratio_only": f"|h| >= {min_ratio:g} x median"},
        "massive": find_massive(maps, medians),
        "massive_ratio_only": find_massive(maps, medians, min_abs=0.0, min_ratio=min_ratio),
    }
    if quantization:
        report["quantization"] = ptq_losses(model, batches)
    return report, maps


def write_report(report, maps, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    best = report["max_ratio"]["layer"]
    plots = [plot_activations(report["layers"], os.path.join(out_dir, "activations.png")),
             plot_activation_map(maps[best], best, os.path.join(out_dir, "activation_map.png")),
             plot_masses(report["layers"], os.path.join(out_dir, "attention_mass.png"))]
    if "bb" in report["layers"][0]:
        plots.append(plot_bb(report["layers"], os.path.join(out_dir, "bb.png")))
    report["plots"] = [os.path.basename(p) for p in plots]
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(plain(report), f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(report))


def fmt(value, digits=3):
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def token_label(token):
    """A top entry's token for the Markdown report: its text quoted (repr shows spaces and newlines), or its id."""
    return repr(token).replace("|", "\\|") if isinstance(token, str) else f"id {token}"


def bos_sentence(data):
    if data.get("bos"):
        return ("Every probe sequence starts with the BOS token at position 0, as the model saw text in training "
                "(`--no-bos` leaves it out).")
    return "The probe sequences do not start with a BOS token (`--bos` puts one at position 0)."


def report_markdown(r):
    cfg = r["model"]
    lines = [f"# Massive activations and attention sinks: {r.get('target', '')}", "",
             f"Model: {cfg['n_layer']} layers, {cfg['n_head']} heads, n_embd {cfg['n_embd']}, sink={cfg['sink']}, "
             f"attn_fn={cfg['attn_fn']}, attn_gate={cfg['attn_gate']}. Data: {json.dumps(r.get('data', {}))}; "
             f"{r['n_sequences']} sequences of {r['seq_len']} tokens; loss {fmt(r['loss'], 4)}.", "",
             bos_sentence(r.get("data", {})), "",
             f"- Sink rate (Gu et al., alpha on position 0 > {r['sink_rate_eps']}, first {r['sink_rate_T']} "
             f"positions): **{fmt(r['sink_rate'])}%** of (layer, head) pairs"
             + (f"; on the dedicated slot: **{fmt(r['slot_sink_rate'])}%**" if r["slot_sink_rate"] is not None else ""),
             f"- Largest top-1/median ratio: layer {r['max_ratio']['layer']}, {fmt(r['max_ratio']['ratio'])}x "
             f"(|h| {fmt(r['max_ratio']['top'][0])} at position {r['max_ratio']['top'][1]}, dim {r['max_ratio']['top'][2]}, "
             f"token {token_label(r['max_ratio']['token'])})",
             f"- Massive activations ({r['massive_criteria']['sun']}): "
             + (", ".join(f"layer {m['layer']} pos {m['position']} dim {m['dim']} ({m['value']:.4g})"
                          for m in r["massive"][:12]) or "none"),
             f"- Ratio only ({r['massive_criteria']['ratio_only']}): {len(r['massive_ratio_only'])} entries"
             + (f", e.g. layer {r['massive_ratio_only'][0]['layer']} pos {r['massive_ratio_only'][0]['position']} "
                f"dim {r['massive_ratio_only'][0]['dim']}" if r["massive_ratio_only"] else ""),
             f"- Outliers (Bondarenko et al.; max |x| and excess kurtosis over every entry): block output "
             f"{fmt(r['outliers']['resid_max_abs'])} and {fmt(r['outliers']['resid_kurtosis'])}, attention output "
             f"before c_proj {fmt(r['outliers']['attn_max_abs'])} and {fmt(r['outliers']['attn_kurtosis'])} (worst layer)",
             f"- Simulated quantization (PyTorch fake-quant; block Linears): loss {fmt(r['quantization']['loss_float'], 4)} "
             f"in float32, W8A8 (per-channel int8 weights, per-tensor int8 inputs) "
             f"{fmt(r['quantization']['loss_w8a8'], 4)} ({r['quantization']['delta_w8a8']:+.4f}; the int8 weights "
             f"alone {r['quantization']['delta_w8']:+.4f}), W4 (4-bit "
             f"per-channel weights) {fmt(r['quantization']['loss_w4'], 4)} ({r['quantization']['delta_w4']:+.4f})",
             "",
             "| layer | top-1 (pos, dim, token) | top-2 | top-3 | median | ratio | Sun et al. | pos-0 norm / others "
             "| mass on pos 0 | mass on slot | kurtosis | attn max \\|x\\| | attn kurtosis |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["layers"]:
        names = e.get("top_token_text", e["top_tokens"])
        tops = [f"{v:.4g} ({p}, {d}, {token_label(t)})" for (v, p, d), t in zip(e["top"][:3], names)]
        tops += ["-"] * (3 - len(tops))
        lines.append(f"| {e['layer']} | {' | '.join(tops)} | {fmt(e['median'])} | {fmt(e['ratio'])} | "
                     f"{'yes' if e['sun_massive'] else 'no'} | {fmt(e['pos0_norm_ratio'])} | "
                     f"{fmt(e['first_token_mass_mean'])} | {fmt(e['slot_mass_mean'])} | {fmt(e['resid_kurtosis'])} | "
                     f"{fmt(e['attn_max_abs'])} | {fmt(e['attn_kurtosis'])} |")
    if r["layers"][0]["sink_token_top"] is not None:
        lines += ["", "Sink-token prefix (positions < 0), top-1 |h| per layer: " +
                  ", ".join(f"{e['sink_token_top'][0][0]:.4g} (pos {e['sink_token_top'][0][1]}, dim "
                            f"{e['sink_token_top'][0][2]})" for e in r["layers"])]
    if "bb" in r["layers"][0]:
        lines += ["", "## Bigram-Backcopy (per head: layer.head)", "",
                  "| head | BOS, dormant | BOS, active | slot, dormant | slot, active | value norm BOS / others |",
                  "|---|---|---|---|---|---|"]
        for e in r["layers"]:
            bb = e["bb"]
            for h in range(len(bb["dormant_bos"])):
                slot = [fmt(bb[k][h]) if bb[k] is not None else "-" for k in ("dormant_slot", "active_slot")]
                lines.append(f"| {e['layer']}.{h} | {fmt(bb['dormant_bos'][h])} | {fmt(bb['active_bos'][h])} | "
                             f"{slot[0]} | {slot[1]} | {fmt(bb['value_bos'][h])} / {fmt(bb['value_other'][h])} |")
        lines += ["", "BOS residual norm / others after each block: " +
                  ", ".join(f"{fmt(e['bb']['resid_bos'])} / {fmt(e['bb']['resid_other'])}" for e in r["layers"])]
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in r.get("plots", [])), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# comparing runs


def run_series(events):
    """Curves over iterations: val loss, the largest |h| and top-1/median ratio over layers, dLoss/dh at that
    largest entry, mean masses on position 0 and on the slot, and the signed m and update of tracked single
    weights ('opt_m/...', 'opt_update/...')."""
    val = [(e["iter"], e["val_loss"]) for e in events if e.get("val_loss") is not None]
    tracked = [e for e in events if "track_ratio" in e]

    def at_largest(e, key):  # the value of key at the layer holding the largest |h|
        values, top = e.get(key), e.get("track_top1")
        if values is None or top is None:
            return None
        top = [v if v is not None and math.isfinite(v) else float("-inf") for v in top]
        return values[max(range(len(top)), key=top.__getitem__)]
    pushes = {}
    for e in tracked:
        for key, value in e.items():
            if key.startswith(("opt_m/", "opt_update/")) and value is not None:
                pushes.setdefault(key, []).append((e["iter"], value))
    return {"val_loss": val,
            "max_top1": [(e["iter"], finite_max(e.get("track_top1"))) for e in tracked],
            "max_ratio": [(e["iter"], finite_max(e["track_ratio"])) for e in tracked],
            "grad_top1": [(e["iter"], at_largest(e, "track_grad_top1")) for e in tracked],
            "first_mass": [(e["iter"], finite_mean(e["track_first_mass"])) for e in tracked],
            "slot_mass": [(e["iter"], finite_mean(e["track_slot_mass"])) for e in tracked
                          if e.get("track_slot_mass") is not None],
            "pushes": pushes}


def final_figures(events):
    """The row an ablation table publishes: last val loss, max ratio, % heads sinking on position 0 / slot."""
    val = [e for e in events if e.get("val_loss") is not None]
    tracked = [e for e in events if "track_ratio" in e]
    last = tracked[-1] if tracked else {}
    return {"iter": max((e.get("iter", 0) for e in events), default=0),
            "val_loss": val[-1]["val_loss"] if val else None, "max_ratio": finite_max(last.get("track_ratio")),
            "sink_rate": last.get("track_sink_rate"), "slot_sink_rate": last.get("track_slot_sink_rate")}


def compare(runs, out_dir, names=None):
    names = names or [os.path.basename(os.path.normpath(r)) or r for r in runs]
    if len(set(names)) < len(names):  # e.g. out/a/seed1 and out/b/seed1: name runs by their whole path
        names = list(runs)
    series = {name: run_series(read_metrics(r)) for name, r in zip(names, runs)}
    finals = {name: final_figures(read_metrics(r)) for name, r in zip(names, runs)}
    rows = ["| run | iter | val loss | max top-1/median | % heads sinking on pos 0 | % heads sinking on slot |",
            "|---|---|---|---|---|---|"]
    for name, f in finals.items():
        rows.append(f"| {name} | {f['iter']} | {fmt(f['val_loss'], 4)} | {fmt(f['max_ratio'])} | "
                    f"{fmt(f['sink_rate'])} | {fmt(f['slot_sink_rate'])} |")
    table = "\n".join(rows) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    plot_compare(series, os.path.join(out_dir, "compare.png"))
    if any(s["pushes"] for s in series.values()):
        plot_pushes(series, os.path.join(out_dir, "pushes.png"))
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(f"# Runs compared\n\n{table}\n![compare](compare.png)\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(plain({"runs": dict(zip(names, runs)), "final": finals, "series": series}), f, indent=1)
    return table
