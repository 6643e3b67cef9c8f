"""Per-head hook points (z, head_out), head ablation and activation patching (sinkgpt.heads, analyze.py patch and
ablate --heads): exact equivalences on tiny random models in float64, and bad input as one error line."""
import json

import pytest
import torch

from conftest import idx_batch, randomize, tiny
from sinkgpt.heads import (Metric, ablate_heads, clean_sources, metric_values, patch_heads_together, patch_map,
                           patched_values, site_list, site_patches)
from test_analyze import check_png, run_cli, save_checkpoint, tiny_model

OPTIONS = [dict(), dict(n_head=4, n_kv_head=2), dict(sink="kv_bias", attn_gate="headwise"),
           dict(sink="token", n_sink_tokens=2, mlp_act="swiglu", norm="rmsnorm", pos_emb="rope"),
           dict(attn_gate="elementwise", bias=False, norm_pos="post"),
           dict(attn_window=[3, 0], parallel_residual=True, pos_emb="rope", bias=False, qkv_bias=True)]
IDS = ["plain", "gqa", "kv_bias-headwise", "token-llama", "gate-nobias-post", "window-parallel-qkvbias"]


def model64(seed=0, **options):
    return randomize(tiny(seed=seed, n_layer=3, **options), seed=seed).double().eval()


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_head_shares_sum_to_the_attention_output_plus_bias(options):
    model = model64(**options)
    idx = idx_batch(model, B=2, T=9)
    names = [f"h.{layer}.{p}" for layer in range(3) for p in ("head_out", "attn_out", "z", "attn_z")]
    with torch.no_grad():
        plain, _ = model(idx)
        logits, _, got = model.run_with_cache(idx, names)
    assert (logits - plain).abs().max().item() < 1e-10  # the per-head route computes the same model
    for layer in range(3):
        bias = model.transformer.h[layer].attn.c_proj.bias
        summed = got[f"h.{layer}.head_out"].sum(2) + (0.0 if bias is None else bias)
        assert (summed - got[f"h.{layer}.attn_out"]).abs().max().item() < 1e-10
        z = got[f"h.{layer}.z"]
        assert torch.equal(z.flatten(2), got[f"h.{layer}.attn_z"])
        assert z.shape == (2, 9 + model.n_prefix, model.config.n_head, model.config.head_size)


def test_head_out_is_computed_only_when_hooked():
    model = model64()
    calls = []
    original = torch.einsum

    def counting_einsum(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)
    idx = idx_batch(model, T=8)
    torch.einsum = counting_einsum
    try:
        with torch.no_grad():
            plain, _ = model(idx)
            with model.hooks({"h.0.z": lambda x: None, "h.1.attn_out": lambda x: None}):
                read, _ = model(idx)
            assert calls == []  # no per-head shares without a head_out hook
            with model.hooks({"h.1.head_out": lambda x: None}):
                model(idx)
            assert calls == ["bthd,chd->bthc"]  # one layer's, the hooked one
    finally:
        torch.einsum = original
    assert torch.equal(plain, read)


def test_head_points_patch_downstream():
    model = model64(n_head=4, n_kv_head=2)
    idx = idx_batch(model, T=8)
    c_proj = model.transformer.h[1].attn.c_proj
    with torch.no_grad():
        _, _, got = model.run_with_cache(idx, ["h.1.head_out", "h.1.attn_out"])
        doubled = got["h.1.head_out"].clone()
        doubled[:, :, 2] *= 2
        with model.hooks({"h.1.head_out": lambda x: doubled}):
            _, _, after = model.run_with_cache(idx, ["h.1.attn_out"])
    expected = got["h.1.attn_out"] + got["h.1.head_out"][:, :, 2]
    assert (after["h.1.attn_out"] - expected).abs().max().item() < 1e-10
    assert c_proj.bias is not None


@pytest.mark.parametrize("options", OPTIONS[:3], ids=IDS[:3])
def test_a_head_zeroed_through_the_hook_equals_zeroing_its_c_proj_columns(options):
    model = model64(**options)
    layer, head, D = 1, 1, model.config.head_size
    idx = idx_batch(model, B=3, T=10)
    batches = [(idx[:, :-1], idx[:, 1:])]
    result = ablate_heads(model, batches, [(layer, head)], [(2, 0, 5)])
    edited = model64(**options)
    with torch.no_grad():
        edited.transformer.h[layer].attn.c_proj.weight[:, head * D:(head + 1) * D] = 0.0
        logits_hook, _ = edited(idx[:, :-1], idx[:, 1:])
        with model.hooks({f"h.{layer}.z": lambda x: torch.cat([x[:, :, :head], 0 * x[:, :, head:head + 1],
                                                               x[:, :, head + 1:]], 2)}):
            patched, _ = model(idx[:, :-1], idx[:, 1:])
        _, loss = edited(idx[:, :-1], idx[:, 1:])
        _, _, got = edited.run_with_cache(idx[:, :-1], ["h.2.resid_post"])
    assert (patched - logits_hook).abs().max().item() < 1e-10
    assert abs(result["loss_zero"] - loss.item()) < 1e-10
    assert abs(result["entries_zero"][0] - got["h.2.resid_post"][:, 0, 5].mean().item()) < 1e-10
    assert result["loss_zero"] != result["loss_none"]


def test_mean_ablation_writes_the_mean_over_sequences_at_each_position():
    model = model64()
    idx = idx_batch(model, B=4, T=9)
    batches = [(idx[:2, :-1], idx[:2, 1:]), (idx[2:, :-1], idx[2:, 1:])]
    result = ablate_heads(model, batches, [(0, 1)], [])
    with torch.no_grad():
        _, _, got = model.run_with_cache(idx[:, :-1], ["h.0.z"])
        mean = got["h.0.z"][:, :, 1].mean(0)

        def fill(x):
            x = x.clone()
            x[:, :, 1] = mean
            return x
        losses = []
        for x, y in batches:
            with model.hooks({"h.0.z": fill}):
                losses.append(model(x, y)[1].item())
    assert abs(result["loss_mean"] - sum(losses) / 2) < 1e-10


def corrupted(model, T=10):
    clean = idx_batch(model, B=1, T=T, seed=3)
    corrupt = clean.clone()
    corrupt[0, 2] = (corrupt[0, 2] + 5) % model.config.vocab_size  # one token changed
    return clean, corrupt


@pytest.mark.parametrize("kind", ["heads", "resid", "attn", "mlp"])
def test_patching_a_run_into_itself_changes_nothing(kind):
    model = model64(n_head=4, n_kv_head=2, sink="kv_bias")
    clean, _ = corrupted(model)
    for metric in (Metric("loss"), Metric("logit_diff", good=3, bad=4), Metric("entry", layer=1, dim=7)):
        sites = site_list(model, kind, clean.size(1), metric)
        unpatched = metric_values(model, clean, metric)
        one_by_one = patched_values(model, clean, clean, kind, sites, metric, batch_size=1)
        assert torch.equal(one_by_one, unpatched.expand(len(sites))), kind  # bit for bit
        batched = patched_values(model, clean, clean, kind, sites, metric, batch_size=5)
        assert (batched - unpatched).abs().max().item() < 1e-12  # other batch shapes: float64 rounding only


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_patching_every_site_reproduces_the_clean_run(options):
    model = model64(**options)
    clean, corrupt = corrupted(model)
    with torch.no_grad():
        reference, _ = model(clean)

    def logits_with(*kinds_and_sites):
        patches = {}
        for kind, sites in kinds_and_sites:
            placed = [(0, layer, index) for layer, index in sites]
            patches.update(site_patches(model, kind, placed, clean_sources(model, clean, kind, 0)))
        with torch.no_grad(), model.hooks(patches):
            return model(corrupt)[0]
    embeddings = ("resid", [(0, p) for p in range(10)])  # every position of the first block's input
    heads, mlps = ("heads", site_list(model, "heads", 10, Metric("loss"))), ("mlp", site_list(model, "mlp", 10, Metric("loss")))
    assert not torch.equal(logits_with(), reference)
    assert torch.equal(logits_with(embeddings), reference)
    assert torch.equal(logits_with(heads, mlps, embeddings), reference)  # every head, every MLP, the embeddings
    assert not torch.equal(logits_with(heads, mlps), reference)  # the corrupt token's embedding still counts
    # through the metric: the loss of the corrupt run's targets under the clean logits
    loss = Metric("loss")
    with torch.no_grad():
        clean_input = model.run_with_cache(clean, ["h.0.resid_pre"])[2]["h.0.resid_pre"]
    assert torch.equal(patched_values(model, clean, corrupt, "resid", embeddings[1], loss, one_run=True),
                       metric_values(model, corrupt, loss, {"h.0.resid_pre": lambda x: clean_input}))


def test_the_recovery_map_is_one_where_the_only_difference_is_and_aligned_mode_pairs_positions():
    model = model64()
    clean, corrupt = corrupted(model)
    result = patch_map(model, clean, corrupt, "resid", Metric("loss"))
    recovery = result["recovery"]
    assert recovery[0][2] == pytest.approx(1.0, abs=1e-12)  # the changed token's embedding: all of it
    assert all(recovery[0][p] == pytest.approx(0.0, abs=1e-12) for p in (0, 1))  # before it: nothing changes
    # a clean prompt with one extra token in front, paired position by position
    longer = torch.cat([torch.tensor([[model.config.bos_token]]), corrupt], 1)
    aligned = patch_map(model, longer, corrupt, "heads", Metric("entry", layer=1, positions=(4, 5), dim=3), align=1)
    assert len(aligned["recovery"]) == 2 and len(aligned["recovery"][0]) == 2  # layers 0-1 x 2 heads
    with torch.no_grad():
        _, _, got = model.run_with_cache(longer, ["h.1.resid_post"])
    assert aligned["clean"] == pytest.approx(got["h.1.resid_post"][0, 5:7, 3].mean().item(), abs=1e-12)


def test_heads_patched_together_and_the_activation_metrics_read_the_right_tensors():
    model = model64(n_head=4, n_kv_head=2)
    clean, corrupt = corrupted(model)
    longer = torch.cat([torch.tensor([[model.config.bos_token]]), clean], 1)
    neuron = Metric("neuron", layer=1, positions=(3, 4, 5), dim=11)
    heads = [(0, 1), (1, 3)]
    result = patch_heads_together(model, longer, corrupt, heads, neuron, align=1)
    with torch.no_grad():
        _, _, got = model.run_with_cache(corrupt, ["h.1.mlp_post"])
        _, _, clean_got = model.run_with_cache(longer, ["h.0.z", "h.1.z"])

        def patch(layer, head):
            def fn(x):
                x = x.clone()
                x[:, :, head] = clean_got[f"h.{layer}.z"][:, 1:, head]  # clean position i + 1 -> corrupt i
                return x
            return fn
        with model.hooks({"h.0.z": patch(0, 1), "h.1.z": patch(1, 3)}):
            _, _, patched = model.run_with_cache(corrupt, ["h.1.mlp_post"])
    assert result["profile"]["corrupt"] == got["h.1.mlp_post"][0, :, 11].tolist()
    assert result["profile"]["patched"] == patched["h.1.mlp_post"][0, :, 11].tolist()
    assert result["patched"] == pytest.approx(patched["h.1.mlp_post"][0, 3:6, 11].mean().item(), abs=1e-12)
    assert result["corrupt"] == pytest.approx(got["h.1.mlp_post"][0, 3:6, 11].mean().item(), abs=1e-12)
    # one site per copy: the same value as the map's entry for that head
    single = patch_map(model, longer, corrupt, "heads", neuron, align=1)["patched"][1][3]
    alone = patch_heads_together(model, longer, corrupt, [(1, 3)], neuron, align=1)["patched"]
    assert single == pytest.approx(alone, abs=1e-12)


def test_patch_cli_writes_the_map_table_and_plot(tmp_path, capsys):
    save_checkpoint(tiny_model(), tmp_path / "ckpt.pt")
    out = tmp_path / "p"
    code, stdout, err = run_cli(["patch", tmp_path, "--clean", "abcdefgh", "--corrupt", "abcdwfgh", "--metric", "loss",
                                 "--sites", "heads", "--report", out], capsys)
    assert code == 0, err
    result = json.loads((out / "patch_heads.json").read_text())
    assert len(result["recovery"]) == 3 and len(result["recovery"][0]) == 2
    assert "| layer |" in (out / "patch_heads.md").read_text()
    check_png(out / "patch_heads.png")
    code, stdout, err = run_cli(["patch", tmp_path, "--clean", "abcdefgh", "--corrupt", "abcdefgh", "--bos", "clean",
                                 "--align", "1", "--metric", "entry", "--entry", "1:all:3", "--sites", "resid",
                                 "--report", out], capsys)
    assert code == 0, err
    result = json.loads((out / "patch_resid.json").read_text())
    assert len(result["recovery"][0]) == 8 and result["align"] == 1
    code, stdout, err = run_cli(["patch", tmp_path, "--clean", "ab", "--corrupt", "ab", "--repeat", 4, "--bos", "clean",
                                 "--align", "1", "--metric", "neuron", "--neuron", "2:1-7:5", "--heads", "0.1,1.0",
                                 "--report", out], capsys)
    assert code == 0, err
    together = json.loads((out / "patch_heads_together.json").read_text())
    assert together["heads"] == ["0.1", "1.0"] and len(together["profile"]["patched"]) == 8
    code, stdout, err = run_cli(["ablate", tmp_path, "--text", "abcdefgabcdefg", "--heads", "1.0,2.1",
                                 "--entry", "1:0:3", "--report", out], capsys)
    assert code == 0, err
    ablated = json.loads((out / "ablate_heads.json").read_text())
    assert ablated["heads"] == ["1.0", "2.1"] and len(ablated["entries_zero"]) == 1


@pytest.mark.parametrize("argv", [
    ["ablate", "{tmp}", "--text", "abcdefg", "--heads", "3.0"],  # layer out of range
    ["ablate", "{tmp}", "--text", "abcdefg", "--heads", "1.2"],  # head out of range
    ["ablate", "{tmp}", "--text", "abcdefg", "--heads", "1-0"],
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--sites", "heads", "--metric", "entry", "--entry",
     "0:1:32"],  # dim outside the width
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "entry", "--entry", "4:1:3"],  # layer
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "entry", "--entry", "0:4:3"],  # position
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "entry"],  # no --entry
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "neuron", "--neuron", "0:1:128"],
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "entry", "--entry", "0:x:3"],
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--heads", "0.2"],  # head out of range
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--repeat", "0"],
    ["patch", "{tmp}", "--clean", "abcde", "--corrupt", "abce", "--metric", "loss"],  # lengths differ
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abcd", "--bos", "clean", "--metric", "loss"],  # needs --align
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "logit_diff", "--good", "a"],  # no --bad
    ["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "loss", "--sites", "neurons"],
])
def test_bad_head_and_patch_input_is_one_error_line(tmp_path, capsys, argv):
    save_checkpoint(tiny_model(), tmp_path / "ckpt.pt")
    code, out, err = run_cli([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, named", [
    (["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--heads", ""], "--heads ''"),  # not the map
    (["ablate", "{tmp}", "--text", "abcdefg", "--heads", ""], "--heads ''"),  # not the entries' ablation
    (["patch", "{tmp}", "--clean", "", "--corrupt", "abce"], "the --clean text is empty"),
    (["patch", "{tmp}", "--clean", "abcd", "--corrupt", "a"], "the --corrupt prompt gives 1 token:"),
    (["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--repeat", "5"], "the --clean prompt of 20 tokens"),
    (["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "entry", "--entry", "0:3-1:2"],
     "3-1 is an empty range"),
    (["patch", "{tmp}", "--clean", "abcd", "--corrupt", "ab\u20acd"], "--corrupt text: characters not in"),
    (["patch", "{tmp}", "--clean", "abcd", "--corrupt", "abce", "--metric", "logit_diff", "--good", "a", "--bad", ""],
     "the --bad text is empty"),
])
def test_bad_patch_input_names_the_flag_it_came_from(tmp_path, capsys, argv, named):
    save_checkpoint(tiny_model(), tmp_path / "ckpt.pt")
    code, out, err = run_cli([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert named in err, err


def test_the_length_error_offers_the_aligned_mode(tmp_path, capsys):
    save_checkpoint(tiny_model(), tmp_path / "ckpt.pt")
    code, out, err = run_cli(["patch", tmp_path, "--clean", "abcd", "--corrupt", "abcd", "--bos", "clean"], capsys)
    assert code == 1 and "--align 1" in err, err
