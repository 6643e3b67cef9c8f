"""The analysis (sinkgpt.stats, measure, probes, report, tracking and analyze.py): metrics on hand-computed
patterns, a planted massive activation found where it was planted, interventions, every sink option, the CLI on
checkpoints and GPT-2 directories, compare, and the tracker."""

import json
import math
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import analyze  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sinkgpt.measure import capture, collect  # noqa: E402
from sinkgpt.probes import ablate, attribute, intervene  # noqa: E402
from sinkgpt.report import build_report, report_markdown  # noqa: E402
from sinkgpt.stats import (bb_masses, find_massive, first_token_mass, key_mass, rate_from_alphas,  # noqa: E402
                           safe_ratio, sequence_medians, sequence_ratios, sink_alpha, slot_mass, split_pattern, top_entries,
                           value_norms)
from sinkgpt.tracking import ActivationTracker  # noqa: E402

V = 24  # tiny vocabulary: 23 characters + BOS
CHARS = list("abcdefghijklmnopqrstuvw")
META = {"tokenizer": "char", "chars": CHARS, "bos_token": V - 1, "vocab_size": V}
PLANT_LAYER, PLANT_DIM, READ_DIM, NEURON = 1, 7, 3, 5
SLOT_OPTIONS = ("token", "logit", "softmax1", "kv_bias", "k_bias")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("SINKGPT_OFFLINE", "1")  # the bundled GPT-2 ranks: no network wait


def tiny_model(seed=0, n_layer=3, **options):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=V, block_size=16, n_layer=n_layer, n_head=2, n_embd=32, bos_token=V - 1, **options)
    return GPT(config).eval()


def tokens(batch=4, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V - 1, (batch, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def planted_model(value=1000.0, **options):
    """A tiny GPT whose block output has |h| ~ value at (position 0, PLANT_DIM) from PLANT_LAYER on: position
    embedding 0 carries a large component on READ_DIM, one MLP neuron of PLANT_LAYER reads it (its bias keeps
    it silent everywhere else) and writes PLANT_DIM through c_proj."""
    model = tiny_model(**options)
    mlp = model.transformer.h[PLANT_LAYER].mlp
    with torch.no_grad():
        model.transformer.wpe.weight[0, READ_DIM] = 5.0
        mlp.c_fc.weight[NEURON] = 0.0
        mlp.c_fc.weight[NEURON, READ_DIM] = 10.0
        mlp.c_fc.bias[NEURON] = -30.0
        mlp.c_proj.weight[:, NEURON] = 0.0
        x, _ = tokens()
        name = f"h.{PLANT_LAYER}.mlp_post"
        act = capture(model, x, [name])[0][name][:, model.n_prefix, NEURON].mean()
        mlp.c_proj.weight[PLANT_DIM, NEURON] = value / act
    return model


def save_checkpoint(model, path, dataset=None):
    torch.save({"model": model.state_dict(), "model_args": model.config.to_dict(), "meta": META,
                "config": {"dataset": dataset, "seed": 1337}, "iter_num": 0}, path)
    return str(path)


def all_hooks_empty(model):
    return not model.hook_fns and all(not block.hook_fns for block in model.transformer.h)


def sink_rate(patterns, n_slot=0, eps=0.3, T=64, on="first"):
    """Gu et al.'s Sink_1^eps in percent over every layer's pattern, as collect() computes it."""
    return rate_from_alphas([sink_alpha(p, n_slot, on, T) for p in patterns], eps)


def run_cli(argv, capsys):
    argv = [str(a) for a in argv]
    if argv[0] != "compare" and "--device" not in argv:  # the figures here are the CPU's, also on GPU machines
        argv += ["--device", "cpu"]
    code = analyze.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------------
# metrics on hand-computed patterns


def causal_pattern(rows):
    """(1, H, T, T) from per-head lists of rows (each row padded with zeros)."""
    T = len(rows[0])
    return torch.tensor([[row + [0.0] * (T - len(row)) for row in head] for head in rows])[None]


def test_masses_and_sink_rate_by_hand():
    # head 0 sinks on position 0, head 1 attends to itself
    pattern = causal_pattern([[[1.0], [0.6, 0.4], [0.2, 0.3, 0.5], [0.4, 0.2, 0.2, 0.2]],
                              [[1.0], [0.0, 1.0], [0.0, 0.0, 1.0], [0.1, 0.0, 0.0, 0.9]]])
    assert torch.allclose(first_token_mass(pattern), torch.tensor([(0.6 + 0.2 + 0.4) / 3, 0.1 / 3]))
    assert slot_mass(pattern) is None
    # Gu et al.'s alpha counts query 0 too: (1 + 0.6 + 0.2 + 0.4) / 4 and (1 + 0 + 0 + 0.1) / 4
    assert torch.allclose(sink_alpha(pattern), torch.tensor([[0.55, 0.275]]))
    assert sink_rate([pattern, pattern]) == 50.0
    assert sink_rate([pattern], eps=0.2) == 100.0
    assert sink_rate([pattern], T=2) == 100.0  # first 2 queries only: (1 + 0.6)/2 and (1 + 0)/2
    # attention each key receives from the later queries (i > j), mean over those queries and the heads
    received = key_mass(pattern)
    assert torch.allclose(received[:3], torch.tensor([(0.4 + 0.1 / 3) / 2, (0.25 + 0.0) / 2, (0.2 + 0.0) / 2]))
    assert received[3].isnan()


def test_slot_and_sink_token_columns_by_hand():
    # a slot sink: column 0 is the slot, every real query row sees it
    slot_pattern = torch.tensor([[[[0.5, 0.5, 0.0, 0.0], [0.7, 0.2, 0.1, 0.0], [0.1, 0.3, 0.3, 0.3]]]])
    assert torch.allclose(slot_mass(slot_pattern, 1), torch.tensor([0.4]))
    assert torch.allclose(first_token_mass(slot_pattern, 1), torch.tensor([0.25]))
    assert torch.allclose(sink_alpha(slot_pattern, 1, "slot"), torch.tensor([[(0.5 + 0.7 + 0.1) / 3]]))
    assert sink_rate([slot_pattern], 1, on="slot") == 100.0 and sink_rate([slot_pattern], 1) == 100.0
    # a sink token: the prefix adds a row and a column; dropping the prefix row gives the same numbers
    token_pattern = torch.cat([torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]]), slot_pattern], dim=2)
    slot, real = split_pattern(token_pattern, 1)
    assert slot.shape == (1, 1, 3, 1) and real.shape == (1, 1, 3, 3)
    assert torch.allclose(slot_mass(token_pattern, 1), torch.tensor([0.4]))
    assert torch.allclose(first_token_mass(token_pattern, 1), torch.tensor([0.25]))


def test_bb_masses_by_hand():
    pattern = causal_pattern([[[1.0], [0.9, 0.1], [0.2, 0.8], [0.8, 0.1, 0.1]]])
    trigger = torch.tensor([[False, False, True, False]])  # query 2 must copy: active; 1 and 3 are dormant
    out = bb_masses(pattern, trigger)
    assert torch.allclose(out["dormant_bos"], torch.tensor([(0.9 + 0.8) / 2]))
    assert torch.allclose(out["active_bos"], torch.tensor([0.2]))
    assert out["dormant_slot"] is None
    with_slot = torch.cat([torch.full((1, 1, 4, 1), 0.5), pattern * 0.5], dim=-1)
    out = bb_masses(with_slot, trigger, n_slot=1)
    assert torch.allclose(out["dormant_slot"], torch.tensor([0.5])) and torch.allclose(out["active_slot"], torch.tensor([0.5]))
    assert torch.allclose(out["dormant_bos"], torch.tensor([0.85 / 2]))


def test_value_norms_match_an_explicit_projection():
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 5, 4
    v, W = torch.randn(B, H, T, D), torch.randn(H * D, H * D)
    bos, other = value_norms(v, W)
    for h in range(H):  # head h's values through its columns of c_proj
        projected = v[:, h] @ W[:, h * D:(h + 1) * D].T  # (B, T, C)
        norms = projected.norm(dim=-1)
        assert torch.allclose(bos[h], norms[:, 0].mean(), rtol=1e-4)
        assert torch.allclose(other[h], norms[:, 1:].mean(), rtol=1e-4)


def test_top_entries_medians_and_massive_criteria_by_hand():
    resid = torch.full((2, 4, 8), 0.1)
    resid[1, 0, 3] = -250.0  # large and 2500x the median: massive for Sun et al.
    resid[0, 2, 5] = 20.0  # 200x the median: ratio-only
    absmax = resid.abs().amax(0)  # what collect() keeps per layer: the largest |h| over the batch
    top, median = top_entries(absmax, 2), sequence_medians(resid).mean().item()
    assert top == [[250.0, 0, 3], [20.0, 2, 5]]
    assert math.isclose(median, 0.1, rel_tol=1e-6) and math.isclose(safe_ratio(top[0][0], median), 2500.0, rel_tol=1e-5)
    sun = find_massive([absmax], [median])
    ratio_only = find_massive([absmax], [median], min_abs=0.0, min_ratio=100.0)
    assert [(m["position"], m["dim"]) for m in sun] == [(0, 3)]
    assert [(m["position"], m["dim"]) for m in ratio_only] == [(0, 3), (2, 5)]


def test_the_ratio_divides_each_sequence_s_top_1_by_its_own_median_then_takes_the_largest():
    """Sequence 0: median 1, top 100 (ratio 100); sequence 1: median 0.01, top 0.5 (ratio 50). A maximum over
    every sequence divided by the mean median would say 100 / 0.505 = 198."""
    resid = torch.ones(2, 4, 8)
    resid[0, 1, 2] = 100.0
    resid[1] = 0.01
    resid[1, 3, 7] = -0.5
    assert torch.allclose(sequence_ratios(resid), torch.tensor([100.0, 50.0]))
    model, (x, y) = tiny_model(), tokens()
    report, _ = build_report(model, [(x, y)], k=1)
    _, _, cache = model.run_with_cache(x, [f"h.{layer}.resid_post" for layer in range(3)])
    for layer in report["layers"]:
        by_hand = sequence_ratios(cache[f"h.{layer['layer']}.resid_post"]).max().item()
        assert math.isclose(layer["ratio"], by_hand, rel_tol=1e-5)


def test_the_report_names_the_input_token_at_each_top_entry():
    """The token is the one in the sequence that holds the entry's largest |h|, found here by hand."""
    from sinkgpt.tokenizer import CharTokenizer
    model, batches = tiny_model(), [tokens(seed=1), tokens(seed=2)]
    tokenizer = CharTokenizer([chr(ord("a") + i) for i in range(V - 1)], V - 1)
    report, _ = build_report(model, batches, k=3, tokenizer=tokenizer)
    x = torch.cat([b[0] for b in batches])
    _, _, cache = model.run_with_cache(x, [f"h.{layer}.resid_post" for layer in range(3)])
    for layer in report["layers"]:
        resid = cache[f"h.{layer['layer']}.resid_post"].abs()
        for (value, pos, dim), token, text in zip(layer["top"], layer["top_tokens"], layer["top_token_text"]):
            holder = resid[:, pos, dim].argmax().item()
            assert math.isclose(resid[holder, pos, dim].item(), value, rel_tol=1e-5)
            assert token == x[holder, pos].item() and text == tokenizer.decode([token])
    line = next(row for row in report_markdown(dict(report, data={"bos": False})).splitlines() if row.startswith("| 0 |"))
    value, pos, dim = report["layers"][0]["top"][0]
    assert f"({pos}, {dim}, {report['layers'][0]['top_token_text'][0]!r})" in line


# ----------------------------------------------------------------------------------------------------
# a planted massive activation


def test_planted_massive_activation_is_found_where_it_was_planted():
    model = planted_model()
    report, maps = build_report(model, [tokens()], k=3)
    layers = report["layers"]
    for layer in range(PLANT_LAYER, model.config.n_layer):
        value, pos, dim = layers[layer]["top"][0]
        assert (pos, dim) == (0, PLANT_DIM) and 700 < value < 1300, layers[layer]["top"]
        assert layers[layer]["ratio"] > 1000
    assert layers[0]["top"][0][0] < 50 and layers[0]["ratio"] < 1000
    flagged = {(m["layer"], m["position"], m["dim"]) for m in report["massive"]}
    assert flagged == {(layer, 0, PLANT_DIM) for layer in range(PLANT_LAYER, model.config.n_layer)}
    assert report["max_ratio"]["layer"] >= PLANT_LAYER and report["max_ratio"]["top"][1:] == [0, PLANT_DIM]
    assert maps[PLANT_LAYER].shape == (16, 32) and maps[PLANT_LAYER].argmax().item() == PLANT_DIM
    assert all_hooks_empty(model)


def test_planted_activation_in_a_sink_token_model_is_at_real_position_0():
    model = planted_model(sink="token", n_sink_tokens=2)
    layers = build_report(model, [tokens()])[0]["layers"]
    assert layers[PLANT_LAYER]["top"][0][1:] == [0, PLANT_DIM]
    assert all(pos < 0 for e in layers for _, pos, _ in e["sink_token_top"])  # the prefix, reported apart


def test_identity_intervention_changes_nothing_and_scaling_the_planted_dim_does():
    model = planted_model()
    batches = [tokens()]
    name = f"h.{PLANT_LAYER}.resid_post"
    for op, value in (("scale", 1.0), ("add", 0.0)):
        result = intervene(model, batches, name, 0, PLANT_DIM, op, value)
        assert result["loss_after"] == result["loss_before"]
        assert result["first_token_mass_after"] == result["first_token_mass_before"]
        assert result["top1_after"] == result["top1_before"]
    scaled = intervene(model, batches, name, 0, PLANT_DIM, "scale", 0.0)
    assert abs(scaled["delta_loss"]) > 1e-6  # a tiny random model: small, but a real change
    assert scaled["top1_after"][PLANT_LAYER][0] < 100  # the planted entry is gone from that block output
    assert scaled["first_token_mass_after"][PLANT_LAYER + 1] != scaled["first_token_mass_before"][PLANT_LAYER + 1]
    assert all_hooks_empty(model)


def test_ablation_and_mlp_attribution_find_the_planted_neuron():
    model = planted_model()
    batches = [tokens(), tokens(seed=2)]
    result = ablate(model, batches, [(PLANT_LAYER, 0, PLANT_DIM)])
    assert 700 < result["entries"][0]["mean"] < 1300
    assert abs(result["delta_zero"]) > abs(result["delta_mean"])  # the value, not its presence, matters
    attribution = attribute(model, batches, 0, PLANT_DIM, top=3)
    planted = attribution["layers"][PLANT_LAYER]
    assert planted["neurons"][0][0] == NEURON and planted["mlp"] > 700
    assert math.isclose(planted["neuron_sum"] + planted["bias"], planted["mlp"], rel_tol=1e-4)
    assert abs(attribution["layers"][0]["mlp"]) < 10


# ----------------------------------------------------------------------------------------------------
# every sink option


@pytest.mark.parametrize("options", [{"sink": s} for s in ("none", "token", "logit", "softmax1", "kv_bias", "k_bias",
                                                           "bos_override")]
                         + [{"attn_gate": "headwise"}, {"attn_fn": "sigmoid"}])
def test_every_sink_option_analyses_and_reports_its_slot_mass(options):
    model = tiny_model(n_layer=2, **options)
    x, y = tokens(batch=3)
    stats = collect(model, [(x, y)], [x % 3 == 0])  # with Bigram-Backcopy metrics too
    has_slot = options.get("sink") in SLOT_OPTIONS
    for e in stats["layers"]:
        assert (e["slot_mass"] is not None) == has_slot
        assert (e["bb"]["dormant_slot"] is not None) == has_slot
        assert all(math.isfinite(v) for v in e["first_token_mass"] + e["bb"]["value_ratio"])
    assert (stats["slot_sink_rate"] is not None) == has_slot and math.isfinite(stats["loss"])
    if has_slot:  # masses on the slot and on real keys add up to one row of the softmax
        e = stats["layers"][0]
        assert all(0.0 < s < 1.0 for s in e["slot_mass"])
    assert all_hooks_empty(model)


@pytest.mark.parametrize("options,slot_columns,prefix_rows", [({}, 0, 0), ({"sink": "kv_bias"}, 1, 0),
                                                              ({"sink": "token", "n_sink_tokens": 2}, 2, 2)])
def test_masses_read_the_model_pattern_layout(options, slot_columns, prefix_rows):
    """The report's masses equal the model's own pattern read by hand: slot columns first, then real keys;
    a sink-token prefix also adds rows, which are not queries of the text."""
    model = tiny_model(n_layer=1, **options)
    x, y = tokens(batch=2)
    pattern = capture(model, x, ["h.0.pattern"])[0]["h.0.pattern"]
    assert pattern.shape == (2, 2, prefix_rows + 16, slot_columns + 16)
    real_rows = pattern[:, :, prefix_rows + 1:]  # real queries i >= 1
    layer = collect(model, [(x, y)])["layers"][0]
    assert torch.allclose(torch.tensor(layer["first_token_mass"]), real_rows[..., slot_columns].mean(dim=(0, 2)))
    if slot_columns:
        expected = real_rows[..., :slot_columns].sum(-1).mean(dim=(0, 2))
        assert torch.allclose(torch.tensor(layer["slot_mass"]), expected)


def test_a_large_sink_logit_takes_all_the_mass():
    model = tiny_model(n_layer=2, sink="logit")
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.sink_logit.fill_(30.0)
    stats = collect(model, [tokens()])
    for e in stats["layers"]:
        assert all(s > 0.999 for s in e["slot_mass"]) and all(f < 1e-3 for f in e["first_token_mass"])
    assert stats["slot_sink_rate"] == 100.0 and stats["sink_rate"] == 0.0


# ----------------------------------------------------------------------------------------------------
# the command line


def check_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 2000


def test_report_cli_writes_json_markdown_and_plots(tmp_path, capsys):
    ckpt = save_checkpoint(planted_model(sink="kv_bias"), tmp_path / "ckpt.pt")
    out = tmp_path / "report"
    code, stdout, err = run_cli([tmp_path, "--text", "abcabcabcabcabcabcabc", "--report", out], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    layer = report["layers"][PLANT_LAYER]
    assert layer["top"][0][1:] == [0, PLANT_DIM] and len(layer["slot_mass"]) == 2 and len(layer["first_token_mass"]) == 2
    for key in ("median", "ratio", "first_token_mass", "slot_mass", "alpha_first", "pos0_norm_ratio"):
        assert key in layer
    assert report["sink_rate"] is not None and report["slot_sink_rate"] is not None
    assert any(m["layer"] == PLANT_LAYER and m["dim"] == PLANT_DIM for m in report["massive"])
    assert "| layer |" in (out / "report.md").read_text()
    for name in ("activations.png", "activation_map.png", "attention_mass.png"):
        check_png(out / name)
    assert os.path.exists(ckpt)


def test_probe_subcommands_run_and_write_json(tmp_path, capsys):
    save_checkpoint(planted_model(), tmp_path / "ckpt.pt")
    text = ["--text", "abcdefgabcdefgabcdefg"]
    code, out, err = run_cli(["intervene", tmp_path, *text, "--layer", PLANT_LAYER, "--dim", PLANT_DIM, "--scale", 0,
                              "--report", tmp_path / "iv"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "iv" / "intervene.json").read_text())["delta_loss"] != 0.0
    check_png(tmp_path / "iv" / "intervene.png")
    code, out, err = run_cli(["ablate", tmp_path, *text, "--report", tmp_path / "ab"], capsys)
    assert code == 0, err
    entries = json.loads((tmp_path / "ab" / "ablate.json").read_text())["entries"]
    assert [(e["layer"], e["position"], e["dim"]) for e in entries] == [(PLANT_LAYER, 0, PLANT_DIM)]
    code, out, err = run_cli(["attribute", tmp_path, *text, "--report", tmp_path / "at"], capsys)
    assert code == 0, err
    attribution = json.loads((tmp_path / "at" / "attribute.json").read_text())
    assert attribution["dim"] == PLANT_DIM and attribution["layers"][PLANT_LAYER]["neurons"][0][0] == NEURON
    code, out, err = run_cli(["repeat", tmp_path, "--string", "e", "--n", 12, "--report", tmp_path / "rp"], capsys)
    assert code == 0, err
    repeat = json.loads((tmp_path / "rp" / "repeat.json").read_text())
    assert set(repeat["variants"]) == {"no_bos", "bos"} and len(repeat["variants"]["bos"][0]["resid_norm"]) == 12
    check_png(tmp_path / "rp" / "repeat.png")


@pytest.mark.parametrize("argv", [
    ["{tmp}/missing_run", "--report", "{tmp}/r"],
    ["{tmp}", "--text", "ABC not in the vocabulary", "--report", "{tmp}/r"],
    ["{tmp}", "--text", "abc"],  # no --report
    ["intervene", "{tmp}", "--text", "abc", "--layer", "9", "--dim", "0", "--scale", "2"],
    ["ablate", "{tmp}", "--text", "abc", "--entry", "1:0"],
    ["compare", "{tmp}", "--report", "{tmp}/c"],  # no metrics.jsonl
    ["report", "{tmp}", "--bogus"],
    ["{tmp}", "--text", "abc", "--report", "{tmp}/r", "--device", "foo"],
    ["intervene", "{tmp}", "--text", "abc", "--dim", "0", "--scale", "2"],  # no --layer
    ["{tmp}", "--text", "abc", "--report", "{tmp}/ckpt.pt"],  # --report is a file
])
def test_bad_input_gives_one_error_line_and_exit_1(tmp_path, capsys, argv):
    save_checkpoint(tiny_model(n_layer=2), tmp_path / "ckpt.pt")
    code, out, err = run_cli([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_gpt2_format_directory_analyses_through_the_cli(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    hf.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "report"
    code, stdout, err = run_cli([tmp_path / "gpt2", "--text", "The cat sat on the mat. The dog sat on the log.",
                                 "--report", out], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["bos"] is True and report["seq_len"] > 10  # GPT-2: BOS first, as in the bos_token study
    assert len(report["layers"]) == 2 and report["layers"][0]["slot_mass"] is None
    check_png(out / "attention_mass.png")


def test_compare_overlays_runs_and_tabulates_final_figures(tmp_path, capsys):
    def write_run(name, loss, ratio, sink, slot):
        folder = tmp_path / name
        folder.mkdir()
        events = [{"iter": 0, "val_loss": loss + 1.0}, {"iter": 10, "track_ratio": [2.0, ratio / 2],
                                                        "track_first_mass": [0.1, 0.2], "track_slot_mass": slot and [0.5, 0.7],
                                                        "track_sink_rate": 10.0, "track_slot_sink_rate": slot and 40.0},
                  {"iter": 20, "val_loss": loss}, {"iter": 20, "track_ratio": [3.0, ratio], "track_first_mass": [0.2, 0.4],
                                                  "track_slot_mass": slot and [0.6, 0.8], "track_sink_rate": sink,
                                                  "track_slot_sink_rate": slot}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        return folder
    runs = [write_run("vanilla", 2.5, 40.0, 25.0, None), write_run("kv_bias", 2.4, 8.0, 0.0, 75.0)]
    code, out, err = run_cli(["compare", *runs, "--report", tmp_path / "cmp"], capsys)
    assert code == 0, err
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| vanilla | 20 | 2.5 | 40 | 25 | - |" in table and "| kv_bias | 20 | 2.4 | 8 | 0 | 75 |" in table
    check_png(tmp_path / "cmp" / "compare.png")
    final = json.loads((tmp_path / "cmp" / "compare.json").read_text())["final"]
    assert final["kv_bias"]["slot_sink_rate"] == 75.0
    assert not (tmp_path / "cmp" / "pushes.png").exists()  # no single weight tracked


def test_run_series_follows_the_largest_entry_and_the_signed_pushes():
    """The gradient curve is read at the layer that holds the largest |h| in each record (it can move), and the
    signed m / update of tracked single weights become their own series."""
    from sinkgpt.report import run_series
    w = "transformer.h.1.mlp.c_proj.weight[3,5]"
    events = [{"iter": 10, "track_ratio": [5.0, 9.0], "track_top1": [50.0, 20.0], "track_grad_top1": [-0.5, 0.25],
               "track_first_mass": [0.1, 0.2], f"opt_m/{w}": 0.01, f"opt_update/{w}": -0.002},
              {"iter": 20, "track_ratio": [5.0, 9.0], "track_top1": [10.0, 80.0], "track_grad_top1": [-0.5, 0.75],
               "track_first_mass": [0.1, 0.2], f"opt_m/{w}": -0.03, f"opt_update/{w}": 0.004}]
    s = run_series(events)
    assert s["max_top1"] == [(10, 50.0), (20, 80.0)] and s["max_ratio"] == [(10, 9.0), (20, 9.0)]
    assert s["grad_top1"] == [(10, -0.5), (20, 0.75)]
    assert s["pushes"] == {f"opt_m/{w}": [(10, 0.01), (20, -0.03)], f"opt_update/{w}": [(10, -0.002), (20, 0.004)]}


# ----------------------------------------------------------------------------------------------------
# tracking during training


class ListLoader:
    """A stand-in TokenLoader: fixed batches, a resumable position."""

    def __init__(self, n_batches=3):
        self.batches, self.position = [tokens(seed=i) for i in range(n_batches)], 0

    def next_batch(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_tracker_measures_without_side_effects():
    model = planted_model().train()
    loader = ListLoader()
    tracker = ActivationTracker(model, {"dataset": "shakespeare_char"}, loader)
    assert loader.position == 0  # the val loader's state is restored
    record = tracker.measure()
    json.dumps(record, allow_nan=False)
    assert model.training and all_hooks_empty(model) and all(p.grad is None for p in model.parameters())
    L = model.config.n_layer
    for key in ("track_top1", "track_top1_pos", "track_top1_dim", "track_median", "track_ratio", "track_first_mass",
                "track_grad_pos0", "track_grad_pos0_ratio", "track_grad_top1", "track_pos0_norm_ratio"):
        assert len(record[key]) == L and all(math.isfinite(v) for v in record[key]), key
    assert record["track_slot_mass"] is None and math.isfinite(record["track_sink_rate"])
    assert record["track_top1_pos"][PLANT_LAYER] == 0 and record["track_top1_dim"][PLANT_LAYER] == PLANT_DIM
    assert not any(key.startswith("track_bb_") for key in record)
    assert tracker.measure() == record  # a fixed probe batch: the same model gives the same numbers


def test_tracker_bigram_backcopy_metrics_on_a_tiny_corpus(tmp_path):
    from sinkgpt.bigram_backcopy import BigramBackcopy
    (tmp_path / "tiny.txt").write_text("the cat ate the rat at the gate, then sat at ten.\n" * 4, encoding="utf-8")
    loader = BigramBackcopy("val", 4, 16, n_triggers=2, corpus=tmp_path / "tiny.txt")
    state = loader.state_dict()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=loader.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          bos_token=loader.bos_token, sink="kv_bias"))
    tracker = ActivationTracker(model, {"dataset": "bigram_backcopy"}, loader)
    assert loader.state_dict() == state
    assert (tracker.x[:, 0] == loader.bos_token).all() and tracker.trigger_mask.any()
    record = tracker.measure()
    for key in ("track_bb_dormant_bos", "track_bb_active_bos", "track_bb_value_ratio", "track_bb_dormant_slot"):
        assert len(record[key]) == 2 and all(len(row) == 2 and all(math.isfinite(v) for v in row)
                                             for row in record[key]), key
    assert len(record["track_bb_resid_ratio"]) == 2 and record["track_slot_mass"] is not None
    assert all(p.grad is None for p in model.parameters()) and all_hooks_empty(model)


def test_train_py_appends_tracking_records(tmp_path, monkeypatch):
    import train
    monkeypatch.chdir(REPO)  # the config file and data/ are found from the repository root
    out_dir = tmp_path / "run"
    code = train.main(["config/train_shakespeare_char.py", f"--out_dir={out_dir}", "--max_iters=4", "--track_interval=2",
                       "--eval_interval=4", "--eval_iters=1", "--log_interval=2", "--n_layer=1", "--n_head=2",
                       "--n_embd=32", "--block_size=32", "--batch_size=4", "--sink=softmax1", "--compile=False"])
    assert code == 0
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    tracked = [e for e in events if "track_ratio" in e]
    assert [e["iter"] for e in tracked] == [0, 2, 4]  # the first record is the model before its first step
    assert len(tracked[1]["track_slot_mass"]) == 1 and tracked[1]["track_grad_pos0_ratio"][0] > 0
    assert tracked[0]["track_ratio"] != tracked[1]["track_ratio"]
    # continued into a new folder: the new log starts with the checkpoint's model, at its iteration
    other = tmp_path / "continued"
    code = train.main(["config/train_shakespeare_char.py", f"--out_dir={other}", "--init_from=resume",
                       f"--resume_from={out_dir}", "--max_iters=6", "--track_interval=2", "--eval_interval=6",
                       "--eval_iters=1", "--log_interval=2", "--n_layer=1", "--n_head=2", "--n_embd=32",
                       "--block_size=32", "--batch_size=4", "--sink=softmax1", "--compile=False"])
    assert code == 0
    continued = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    continued = [e for e in continued if "track_ratio" in e]
    assert [e["iter"] for e in continued] == [4, 6]
    assert continued[0]["track_ratio"] == pytest.approx(tracked[-1]["track_ratio"])  # the same model, same probe


def test_compare_names_a_metrics_line_that_is_not_an_object(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0, "val_loss": 2.0}\n[1, 2]\n')
    code, out, err = run_cli(["compare", tmp_path, "--report", tmp_path / "c"], capsys)
    assert code == 1 and err.startswith("error: ") and "metrics.jsonl:2 is not a JSON object" in err, err


# ----------------------------------------------------------------------------------------------------
# outliers (Bondarenko et al.): max |x| and excess kurtosis


def test_kurtosis_of_planted_tensors_by_hand():
    from sinkgpt.stats import excess_kurtosis, moment_sums
    n = 400
    spike = torch.zeros(4, 100)
    spike[2, 17] = -250.0  # one entry of size a among n - 1 zeros: kurtosis (n^2 - 3n + 3) / (n - 1), whatever a
    assert math.isclose(excess_kurtosis(moment_sums(spike)), (n * n - 3 * n + 3) / (n - 1) - 3, rel_tol=1e-9)
    signs = torch.ones(1000)
    signs[::2] = -1.0  # +-1 with equal counts: fourth moment 1 = variance^2, excess kurtosis -2
    assert math.isclose(excess_kurtosis(moment_sums(signs)), -2.0, rel_tol=1e-9)
    gauss = torch.randn(200000, generator=torch.Generator().manual_seed(0))
    assert abs(excess_kurtosis(moment_sums(gauss))) < 0.05  # 0 for a Gaussian (sd of the estimate ~0.011)
    halves = moment_sums(gauss[:50000]) + moment_sums(gauss[50000:])  # batches add up exactly
    assert math.isclose(excess_kurtosis(halves), excess_kurtosis(moment_sums(gauss)), rel_tol=1e-9)


def test_collect_reports_max_abs_and_kurtosis_of_block_and_attention_outputs():
    model = planted_model()
    batches = [tokens(), tokens(seed=2)]
    stats = collect(model, batches)
    names = [f"h.{PLANT_LAYER}.resid_post", f"h.{PLANT_LAYER}.attn_z"]
    captured = [capture(model, x, names, y)[0] for x, y in batches]

    def kurtosis(t):  # written out: fourth central moment over squared variance, minus 3
        t = t.double().flatten()
        c = t - t.mean()
        return (c.pow(4).mean() / c.pow(2).mean() ** 2 - 3).item()

    layer = stats["layers"][PLANT_LAYER]
    resid = torch.cat([c[names[0]] for c in captured])
    z = torch.cat([c[names[1]] for c in captured])
    assert math.isclose(layer["resid_kurtosis"], kurtosis(resid), rel_tol=1e-6)
    assert math.isclose(layer["attn_kurtosis"], kurtosis(z), rel_tol=1e-6)
    assert math.isclose(layer["attn_max_abs"], z.abs().max().item(), rel_tol=1e-6)
    assert layer["resid_kurtosis"] > stats["layers"][0]["resid_kurtosis"] > 100  # position 0's planted entries
    plain = collect(tiny_model(), batches)["outliers"]
    assert plain["resid_kurtosis"] < 10 and plain["resid_max_abs"] < 1  # no outlier, no heavy tail
    worst = stats["outliers"]
    assert worst["resid_max_abs"] == max(e["top"][0][0] for e in stats["layers"])
    assert worst["resid_kurtosis"] == max(e["resid_kurtosis"] for e in stats["layers"])


def test_stream_cli_writes_the_grid_and_its_plot(tmp_path, capsys):
    save_checkpoint(planted_model(), tmp_path / "ckpt.pt")
    text = "abcdefghij" * 8  # 80 characters: longer than the model's context of 16
    code, out, err = run_cli(["stream", tmp_path, "--text", text, "--window", "4,8", "--keep", "0,2",
                              "--report", tmp_path / "st"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "st" / "stream.json").read_text())
    assert [(r["keep"], r["window"]) for r in result["rows"]] == [(0, 4), (2, 4), (0, 8), (2, 8)]
    assert all(len(r["losses"]) == 79 and r["route"].startswith("sliding window") for r in result["rows"])
    check_png(tmp_path / "st" / "stream.png")
    code, out, err = run_cli(["stream", tmp_path, "--text", text, "--window", "16", "--keep", "4"], capsys)
    assert code == 1 and "context" in err and len(err.strip().splitlines()) == 1


def test_layer_ticks_stay_readable_at_30_layers():
    from sinkgpt.plots import layer_ticks
    assert layer_ticks(12) == list(range(12))
    assert layer_ticks(30) == list(range(0, 30, 2)) and len(layer_ticks(200)) <= 16
