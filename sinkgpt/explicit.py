"""
A model against its explicit-sink conversion (convert.py, model.bos_as_slot) on the same real tokens: what the
conversion removes (the massive activation, the outliers that hurt int8) and what it costs (nothing, where it is
exact). The original reads BOS first and its prediction at BOS is left out; the converted model reads the real
tokens alone, from position 1.

    result = compare_explicit(original, converted, windows, bos_token, writers=[(11, 1229), (11, 1487)],
                              stream_ids=ids, stream_window=64, repeat_token=token, repeat_n=128)

May import: model, sinkgpt.measure, sinkgpt.quantize, sinkgpt.stats, sinkgpt.streaming.
"""

import math

import torch

from sinkgpt.measure import capture
from sinkgpt.quantize import ptq_losses
from sinkgpt.stats import MASSIVE_ABS, MASSIVE_RATIO, excess_kurtosis, moment_sums
from sinkgpt.streaming import stream_losses


def parse_neurons(text, config, flag):
    """MLP neurons [(layer, neuron)] from 'LAYER:NEURON,...' (a command's `flag`); ValueError naming the item for one
    that is malformed or outside the model."""
    neurons = []
    for item in filter(None, text.split(",")):
        try:
            layer, neuron = (int(part) for part in item.split(":"))
        except ValueError:
            raise ValueError(f"{flag} {item!r} is not LAYER:NEURON") from None
        if not (0 <= layer < config.n_layer and 0 <= neuron < config.hidden_size):
            raise ValueError(f"{flag} {item}: layer or neuron out of range ({config.n_layer} layers, "
                             f"{config.hidden_size} neurons)")
        neurons.append((layer, neuron))
    return neurons


def paired_batches(windows, bos_token):
    """The original's and the converted model's (x, y) on (N, T + 1) real-token windows: [BOS] + w[:T] with the
    target at BOS ignored (-1), and w[:T]; both predict w[1:]."""
    x, y = windows[:, :-1], windows[:, 1:]
    bos = torch.full_like(x[:, :1], bos_token)
    return (torch.cat([bos, x], 1), torch.cat([torch.full_like(bos, -1), y], 1)), (x, y)


def layer_outliers(model, batch, first_real):
    """Per block output over the real positions (from first_real on): the largest |h| with its (position, dim)
    counted in real tokens, the median |h|, their ratio, Sun et al.'s criterion and the excess kurtosis."""
    names = [f"h.{layer}.resid_post" for layer in range(model.config.n_layer)]
    got, loss = capture(model, batch[0], names, batch[1])
    layers = []
    for layer, name in enumerate(names):
        h = got[name][:, first_real:].float()
        magnitude = h.abs().amax(0)  # (T, C): the largest over the sequences
        top = magnitude.flatten().argmax().item()
        position, dim = divmod(top, magnitude.size(1))
        largest, median = magnitude.flatten()[top].item(), h.abs().median().item()
        ratio = largest / median if median > 0 else math.inf
        layers.append({"layer": layer, "max_abs": largest, "position": position, "dim": dim, "median": median,
                       "ratio": ratio, "sun": largest > MASSIVE_ABS and ratio >= MASSIVE_RATIO,
                       "kurtosis": excess_kurtosis(moment_sums(h))})
    return layers, loss, got


def massive_real(got, x, threshold=1000.0):
    """Where a real token still carries |h| > threshold in some block: [(window, position, token, largest |h|)]."""
    largest = torch.stack([h.float().abs().amax(-1) for h in got.values()]).amax(0)  # (N, T)
    return [[int(w), int(p), int(x[w, p]), largest[w, p].item()] for w, p in (largest > threshold).nonzero().tolist()]


def neuron_ablation(model, batch, neurons, first_real):
    """The loss with MLP neurons [(layer, neuron)] set to zero at the real positions (from first_real on)."""
    by_layer = {}
    for layer, neuron in neurons:
        by_layer.setdefault(f"h.{layer}.mlp_post", []).append(neuron)

    def zeroer(columns):
        def patch(x):
            x = x.clone()
            x[:, first_real:, columns] = 0.0
            return x
        return patch
    _, loss = capture(model, batch[0], [], batch[1], patches={n: zeroer(c) for n, c in by_layer.items()})
    return loss


def repeat_magnitudes(model, ids):
    """Per position of one sequence, the largest |h| over every block output and dim: where a massive
    activation forms when one token is repeated."""
    names = [f"h.{layer}.resid_post" for layer in range(model.config.n_layer)]
    device = model.lm_head.weight.device
    got, _ = capture(model, torch.tensor([ids], device=device), names)
    return torch.stack([got[n][0, model.n_prefix:].float().abs().amax(-1) for n in names]).amax(0).tolist()


@torch.no_grad()
def compare_explicit(original, converted, windows, bos_token, writers, stream_ids, stream_window, repeat_token,
                     repeat_n):
    """Original (BOS first) against converted on the same real tokens: logits, per-layer outliers, simulated
    quantization, the writer neurons zeroed, streaming, and the repeated-token probe. Plain values."""
    for model in (original, converted):
        model.eval()
    with_bos, without = paired_batches(windows, bos_token)
    orig_layers, orig_loss, orig_got = layer_outliers(original, with_bos, 1)
    conv_layers, conv_loss, conv_got = layer_outliers(converted, without, 0)
    logits_orig, _ = original(with_bos[0])
    logits_conv, _ = converted(without[0])
    bos_by_layer = [orig_got[f"h.{layer}.resid_post"][:, 0].float().abs().max().item()
                    for layer in range(original.config.n_layer)]
    quant = {"original": ptq_losses(original, [with_bos]), "converted": ptq_losses(converted, [without])}
    zeroed = {"original": neuron_ablation(original, with_bos, writers, 1) - orig_loss,
              "converted": neuron_ablation(converted, without, writers, 0) - conv_loss}
    stream_ids = stream_ids.to(windows.device)
    bos = torch.tensor([bos_token], device=windows.device)
    streaming = {
        "window": stream_window,
        # the first prediction of the original's stream is made at BOS: left out, as everywhere here
        "original_keep_first": stream_losses(original, torch.cat([bos, stream_ids]), 1, stream_window)["losses"][1:],
        "original_window_only": stream_losses(original, stream_ids, 0, stream_window)["losses"],
        "converted_window_only": stream_losses(converted, stream_ids, 0, stream_window)["losses"],
    }
    streaming = {k: v if k == "window" else math.exp(v.mean().item()) for k, v in streaming.items()}
    repeats = [repeat_token] * repeat_n
    repeat = {"token": repeat_token, "n": repeat_n,
              "original_no_bos": repeat_magnitudes(original, repeats),
              "original_bos_first": repeat_magnitudes(original, [bos_token] + repeats[:-1])[1:],
              "converted": repeat_magnitudes(converted, repeats)}
    return {
        "tokens": list(without[0].shape), "writers": writers, "massive_real": massive_real(conv_got, without[0]),
        "max_abs_logit_diff": (logits_orig[:, 1:] - logits_conv).abs().max().item(),
        "loss": {"original": orig_loss, "converted": conv_loss},
        "layers": {"original": orig_layers, "converted": conv_layers}, "bos_max_abs": max(bos_by_layer),
        "bos_max_abs_by_layer": bos_by_layer,
        "quantization": quant, "writers_zeroed": zeroed, "streaming": streaming, "repeat": repeat,
    }


def explicit_markdown(result):
    """The comparison as Markdown tables, with the judged figures first."""
    L = result["layers"]
    q, s, z = result["quantization"], result["streaming"], result["writers_zeroed"]
    top = {k: max(L[k], key=lambda e: e["max_abs"]) for k in L}
    lines = [
        f"Real tokens: {result['tokens'][0]} windows x {result['tokens'][1]}; the original reads BOS first (its "
        "prediction at BOS left out), the converted model the same tokens from position 1.", "",
        "| figure | original (BOS first) | converted (slot) |", "|---|---|---|",
        f"| loss on the real tokens | {result['loss']['original']:.4f} | {result['loss']['converted']:.4f} |",
        f"| largest logit difference | - | {result['max_abs_logit_diff']:.2g} |",
        f"| largest \\|h\\| over real tokens (layer, position, dim) | {fmt_top(top['original'], True)} | "
        f"{fmt_top(top['converted'], True)} |",
        f"| largest \\|h\\| at BOS | {result['bos_max_abs']:,.0f} | never computed |",
        f"| blocks meeting Sun et al. on real tokens | {sum(e['sun'] for e in L['original'])} | "
        f"{sum(e['sun'] for e in L['converted'])} |",
        f"| largest excess kurtosis of a block output | {max(e['kurtosis'] for e in L['original']):,.0f} | "
        f"{max(e['kurtosis'] for e in L['converted']):,.0f} |",
    ]
    for key, name in (("delta_w8", "W8"), ("delta_w8a8", "W8A8"), ("delta_w4", "W4")):
        lines.append(f"| loss change, {name} | {q['original'][key]:+.4f} | {q['converted'][key]:+.4f} |")
    writers = ", ".join(f"{layer}:{n}" for layer, n in result["writers"])
    lines += [f"| loss change, writer neurons {writers} zeroed on real tokens | {z['original']:+.4f} | "
              f"{z['converted']:+.4f} |",
              f"| streaming perplexity, window {s['window']} + the first token kept | {s['original_keep_first']:.2f} | - |",
              f"| streaming perplexity, window {s['window']} only (the slot is always there) | "
              f"{s['original_window_only']:.2f} | {s['converted_window_only']:.2f} |"]
    hits = result["massive_real"]
    lines += ["", f"Real tokens of the converted model with \\|h\\| > 1,000 in some block: {len(hits)} of "
              f"{result['tokens'][0] * result['tokens'][1]}" + (" (window, position, token id, largest \\|h\\|: "
              + "; ".join(f"{w}, {p}, {t}, {v:,.0f}" for w, p, t, v in hits) + "); the original computes the same values there (the "
              "conversion is exact): these are the model's own, not BOS's" if hits else "") + "."]
    r = result["repeat"]
    lines += ["", f"Repeated token {r['token']} x {r['n']}, the largest \\|h\\| at a position over every block: "
              f"original without BOS: positions over 1,000: {sum(v > 1000 for v in r['original_no_bos'])} of "
              f"{r['n']} (largest {max(r['original_no_bos']):,.0f}); original with BOS first (BOS not counted): "
              f"{sum(v > 1000 for v in r['original_bos_first'])} (largest {max(r['original_bos_first']):,.0f}); "
              f"converted: {sum(v > 1000 for v in r['converted'])} (largest {max(r['converted']):,.0f}).", "",
              "| block | original: max \\|h\\| (pos, dim) | median | Sun | kurtosis | converted: max \\|h\\| (pos, dim) "
              "| median | Sun | kurtosis |", "|---|---|---|---|---|---|---|---|---|"]
    for o, c in zip(L["original"], L["converted"]):
        lines.append(f"| {o['layer']} | {fmt_top(o)} | {o['median']:.3g} | {'yes' if o['sun'] else 'no'} | "
                     f"{o['kurtosis']:,.0f} | {fmt_top(c)} | {c['median']:.3g} | {'yes' if c['sun'] else 'no'} | "
                     f"{c['kurtosis']:,.0f} |")
    return "\n".join(lines) + "\n"


def fmt_top(entry, with_layer=False):
    where = f"{entry['layer']}, " if with_layer else ""
    return f"{entry['max_abs']:,.1f} ({where}{entry['position']}, {entry['dim']})"


# each retrofit of a pretrained model, with the data it reads: (options, reads BOS first)
RETROFITS = {
    "attn_gate=headwise": (dict(attn_gate="headwise"), True),
    "attn_gate=elementwise": (dict(attn_gate="elementwise"), True),
    "sink=logit": (dict(sink="logit"), True),
    "sink=softmax1": (dict(sink="softmax1"), True),
    "sink=kv_bias": (dict(sink="kv_bias"), True),
    "sink=k_bias": (dict(sink="k_bias"), True),
    "sink=bos_override": (dict(sink="bos_override"), True),
    "sink=token": (dict(sink="token"), False),
    "sink=token, pos_offset=1": (dict(sink="token", pos_offset=1), False),
    "sink=kv_bias, pos_offset=1": (dict(sink="kv_bias", pos_offset=1), False),
    "none, pos_offset=1": (dict(pos_offset=1), False),
}


@torch.no_grad()
def retrofit_start_costs(load, windows, bos_token):
    """The loss change at step 0 of every retrofit against the plain model reading BOS first, on the same real
    tokens (the prediction made at BOS left out). load(**options) builds the model with a retrofit."""
    with_bos, without = paired_batches(windows, bos_token)
    plain = load().eval()(*with_bos)[1].item()
    costs = {}
    for name, (options, reads_bos) in RETROFITS.items():
        model = load(**options).eval()
        costs[name] = model(*(with_bos if reads_bos else without))[1].item() - plain
    return {"plain_loss": plain, "loss_change": costs}
