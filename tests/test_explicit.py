"""The emergent sink made explicit: a BOS at position 0 converted into a per-layer key/value slot (model.bos_as_slot,
convert.py) computes the original's logits on the real tokens, through every path (forward, KV cache, chunked
prefill, streaming, generation), and every script takes the converted model."""
import json
import os

import pytest
import torch

import analyze
import convert
import sample
from conftest import flags, randomize, run_train, tiny
from model import KVCache, bos_as_slot
from sinkgpt.streaming import stream_losses

TOL = 1e-10
FAMILIES = {  # GPT-2; Llama with GQA, untied, qk_norm and odd sizes; an output gate; multi-head rotary; GPT-NeoX's
    # parallel block with rotary on a quarter of each head; Qwen2's q/k/v biases
    "gpt2": dict(),
    "llama_gqa": dict(pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", bias=False, n_head=6, n_kv_head=2,
                      n_embd=36, tie_embeddings=False, qk_norm=True, mlp_hidden=50, n_layer=3),
    "gate": dict(attn_gate="elementwise"),
    "llama_mqa": dict(pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", bias=False, n_head=3, n_kv_head=1,
                      n_embd=30),
    "gpt_neox": dict(pos_emb="rope", rotary_pct=0.25, parallel_residual=True, mlp_act="gelu_exact",
                     tie_embeddings=False),
    "qwen2": dict(pos_emb="rope", norm="rmsnorm", mlp_act="swiglu", bias=False, qkv_bias=True, n_head=4, n_kv_head=2),
}
BOS = 36


def pair(family, block_size=24):
    original = randomize(tiny(seed=3, block_size=block_size, **FAMILIES[family]), seed=4).double().eval()
    return original, bos_as_slot(original).eval()


def real_tokens(B=3, T=20, seed=5):
    return torch.randint(0, BOS, (B, T), generator=torch.Generator().manual_seed(seed))


def with_bos(x):
    return torch.cat([torch.full_like(x[:, :1], BOS), x], 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_logits_equal_the_bos_first_originals(family):
    original, converted = pair(family)
    assert converted.config.sink == "kv_bias" and converted.config.pos_offset == 1
    assert converted.config.block_size == original.config.block_size - 1
    x = real_tokens()
    with torch.no_grad():
        reference = original(with_bos(x))[0][:, 1:]
        assert (converted(x)[0] - reference).abs().max().item() <= TOL
        # and the slot is BOS's own key and value: a different slot breaks it
        converted.transformer.h[0].attn.v_slot.add_(0.1)
        assert (converted(x)[0] - reference).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_is_exact_through_the_kv_cache_and_chunked_prefill(family):
    original, converted = pair(family)
    x = real_tokens(B=2, T=18, seed=6)
    with torch.no_grad():
        reference = original(with_bos(x))[0][:, 1:]
        for chunks in ([1] * 18, [7, 1, 10], [5, 13]):
            cache, outputs, start = KVCache(converted.config.n_layer), [], 0
            for n in chunks:
                outputs.append(converted(x[:, start:start + n], cache=cache)[0])
                start += n
            assert (torch.cat(outputs, 1) - reference).abs().max().item() <= TOL, chunks


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox"])
def test_streaming_with_the_window_only_equals_the_original_keeping_its_bos(family):
    original, converted = pair(family, block_size=40)
    ids = torch.randint(0, BOS, (70,), generator=torch.Generator().manual_seed(7))
    kept = stream_losses(original, torch.cat([torch.tensor([BOS]), ids]), keep=1, window=16)
    slot = stream_losses(converted, ids, keep=0, window=16)
    assert (kept["losses"][1:] - slot["losses"]).abs().max().item() <= TOL
    if family != "gpt2":  # rotary: a rolling cache, bounded by the slot and the window
        assert slot["largest_cache"] == 17


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa", "gpt_neox"])
def test_greedy_generation_of_the_converted_model_equals_the_originals(family):
    original, converted = pair(family)
    prompt = real_tokens(B=2, T=4, seed=8)
    ours = converted.generate(prompt, 12, temperature=0)
    theirs = original.generate(with_bos(prompt), 12, temperature=0)
    assert torch.equal(ours, theirs[:, 1:])


@pytest.mark.parametrize("options,reason", [
    (dict(sink="logit"), "already has a dedicated sink"), (dict(sink="token"), "already has a dedicated sink"),
    (dict(attn_fn="sigmoid", sink="kv_bias"), "already has a dedicated sink"),
    (dict(attn_fn="sigmoid"), "only softmax"), (dict(pos_offset=1), "already a slot")])
def test_bos_as_slot_refuses_what_it_cannot_convert(options, reason):
    with pytest.raises(ValueError, match=reason):
        bos_as_slot(tiny(**options))


def test_a_converted_model_is_refused_a_second_conversion():
    _, converted = pair("gpt2")
    with pytest.raises(ValueError, match="already has a dedicated sink"):
        bos_as_slot(converted)


# ------------------------------------------------------------------------------------------------
# the command and the scripts


@pytest.fixture(scope="module")
def bos_run(tmp_path_factory, char_dataset):
    """A tiny char model trained with BOS first (a run convert.py accepts)."""
    out = tmp_path_factory.mktemp("explicit") / "bos_run"
    assert run_train(out, char_dataset, max_iters=30, prepend_bos=True, eval_interval=30) == 0
    return str(out)


@pytest.fixture(scope="module")
def converted_run(tmp_path_factory, bos_run, capsys_module=None):
    out = str(tmp_path_factory.mktemp("explicit") / "converted")
    assert convert.main([bos_run, "--out_dir", out, "--windows", "3", "--window_tokens", "20"]) == 0
    return out


def test_convert_writes_a_checked_run_folder(bos_run, converted_run):
    ckpt = torch.load(os.path.join(converted_run, "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"]["sink"] == "kv_bias" and ckpt["model_args"]["pos_offset"] == 1
    assert ckpt["config"]["converted_from"] == bos_run and ckpt["config"]["prepend_bos"] is False
    check = json.load(open(os.path.join(converted_run, "convert.json")))["check"]
    assert check["windows"] == [3, 20] and check["max_abs_logit_diff"] <= 1e-5


def test_convert_removes_neurons_from_the_converted_model(tmp_path, bos_run):
    out = str(tmp_path / "no_neurons")
    assert convert.main([bos_run, "--out_dir", out, "--remove_neurons", "1:5,1:7", "--windows", "2"]) == 0
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    assert state["transformer.h.1.mlp.c_fc.weight"][[5, 7]].abs().sum() == 0
    assert state["transformer.h.1.mlp.c_fc.bias"][[5, 7]].abs().sum() == 0
    assert state["transformer.h.1.mlp.c_proj.weight"][:, [5, 7]].abs().sum() == 0
    assert state["transformer.h.1.mlp.c_fc.weight"][6].abs().sum() > 0


def one_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_convert_bad_input_is_one_line_and_writes_nothing(tmp_path, char_dataset, bos_run, converted_run, capsys):
    plain_run = tmp_path / "plain_run"
    assert run_train(plain_run, char_dataset, max_iters=2, eval_interval=2) == 0
    capsys.readouterr()
    cases = [([str(plain_run)], "not trained with a BOS token"),  # no BOS at position 0
             ([converted_run], "already has a dedicated sink"),
             ([bos_run, "--remove_neurons", "9:1"], "out of range")]
    for args, message in cases:
        out = tmp_path / "out"
        assert convert.main(args + ["--out_dir", str(out)]) == 1
        assert message in one_error(capsys)
        assert not out.exists()
    assert convert.main([bos_run, "--out_dir", converted_run]) == 1  # a folder that holds a run
    assert "already holds a run" in one_error(capsys)


def test_sink_option_model_is_refused(tmp_path, char_dataset, capsys):
    for options, message in ((dict(sink="logit"), "already has a dedicated sink"),
                             (dict(attn_fn="sigmoid"), "only softmax")):
        run = tmp_path / options.get("sink", "sigmoid")
        assert run_train(run, char_dataset, max_iters=2, eval_interval=2, prepend_bos=True, **options) == 0
        capsys.readouterr()
        assert convert.main([str(run), "--out_dir", str(tmp_path / "out")]) == 1
        assert message in one_error(capsys)
        assert not (tmp_path / "out").exists()


def test_sample_and_analyze_take_the_converted_model(tmp_path, bos_run, converted_run, capsys):
    capsys.readouterr()
    args = ["--start=ROMEO:", "--max_new_tokens=15", "--num_samples=1", "--temperature=0"]
    assert sample.main(["--init_from", bos_run] + args) == 0
    original = capsys.readouterr().out
    assert sample.main(["--init_from", converted_run] + args) == 0
    converted = capsys.readouterr().out
    assert original == "<|endoftext|>" + converted  # the original prepends BOS, the converted model has the slot
    assert sample.main(["--init_from", converted_run, "--max_new_tokens=3"]) == 1  # no prompt, and no BOS to start
    assert "give a prompt with --start" in one_error(capsys)
    assert analyze.main([converted_run, "--batches", "1", "--batch_size", "2", "--report", str(tmp_path / "r")]) == 0
    report = json.load(open(tmp_path / "r" / "report.json"))
    assert report["data"]["bos"] is False and report["layers"][0]["slot_mass"] is not None
    for command in (["stream", converted_run, "--window", "8", "--keep", "0", "--tokens", "40"],
                    ["repeat", converted_run, "--string", "a", "--n", "12"]):
        assert analyze.main(command) == 0, command


def test_analyze_explicit_compares_original_and_converted_on_the_same_tokens(tmp_path, bos_run, converted_run,
                                                                           capsys):
    report = tmp_path / "explicit"
    assert analyze.main(["explicit", bos_run, converted_run, "--batches", "1", "--batch_size", "4", "--block_size",
                         "24", "--window", "8", "--tokens", "60", "--string", "a", "--n", "12", "--writers", "1:3",
                         "--report", str(report)]) == 0
    result = json.load(open(report / "explicit.json"))
    assert result["max_abs_logit_diff"] <= 1e-5
    assert result["loss"]["original"] == pytest.approx(result["loss"]["converted"], abs=1e-5)
    assert result["streaming"]["original_keep_first"] == pytest.approx(
        result["streaming"]["converted_window_only"], rel=1e-5)
    assert result["writers"] == [[1, 3]]
    for a, b in zip(result["layers"]["original"], result["layers"]["converted"]):
        assert a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-4)  # the same real tokens, the same residuals
    assert (report / "explicit.png").stat().st_size > 0 and (report / "explicit.md").exists()
    assert analyze.main(["explicit", bos_run, converted_run, "--block_size", "24", "--writers", "9:1"]) == 1
    assert "--writers 9:1: layer or neuron out of range" in one_error(capsys)
    assert analyze.main(["explicit", converted_run, bos_run]) == 1  # the wrong way round
    assert "is not a model whose BOS became a slot" in one_error(capsys)


def test_training_continues_from_the_converted_model_and_its_position_start_holds(tmp_path, char_dataset,
                                                                                 converted_run, capsys):
    run = tmp_path / "trained"
    assert run_train(run, char_dataset, init_from=converted_run, max_iters=20, eval_interval=10,
                     block_size=31) == 0
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["pos_offset"] == 1 and ckpt["model_args"]["sink"] == "kv_bias"
    start = torch.load(os.path.join(converted_run, "ckpt.pt"), weights_only=True)["model"]
    moved = (ckpt["model"]["transformer.h.0.attn.k_slot"] - start["transformer.h.0.attn.k_slot"]).abs().max()
    assert moved > 1e-4  # the slot is a parameter that trains
    capsys.readouterr()
    refusals = [(dict(init_from="resume", pos_offset=2, max_iters=22), "'pos_offset'=2 differs"),
                (dict(init_from="resume", pos_offset=0, max_iters=22), "'pos_offset'=0 differs"),  # named: refused
                (dict(init_from=converted_run, prepend_bos=True), "train it on windows without BOS")]
    for overrides, message in refusals:
        out = run if overrides["init_from"] == "resume" else tmp_path / "other"
        assert run_train(out, char_dataset, **dict(dict(max_iters=2, block_size=31), **overrides)) == 1
        assert message in one_error(capsys)
    assert run_train(run, char_dataset, init_from="resume", max_iters=22, eval_interval=11, block_size=31) == 0


def test_plain_bos_first_and_converted_runs_predict_the_same_tokens(tmp_path, char_dataset, bos_run, converted_run):
    """The comparison of config/study/explicit_smollm2.py: BOS first with windows one longer and the prediction at
    BOS left out of the loss (bos_loss=False), against the converted model: the same step-0 val loss."""
    common = dict(max_iters=0, eval_iters=3)
    assert run_train(tmp_path / "plain", char_dataset, init_from=bos_run, prepend_bos=True, bos_loss=False,
                     block_size=21, **common) == 0
    assert run_train(tmp_path / "slot", char_dataset, init_from=converted_run, block_size=20, **common) == 0
    plain, slot = (json.loads(open(tmp_path / run / "metrics.jsonl").readline()) for run in ("plain", "slot"))
    assert plain["val_loss"] == pytest.approx(slot["val_loss"], abs=1e-5)


def test_the_loader_leaves_the_prediction_at_bos_out_of_the_loss_when_asked(char_dataset):
    from sinkgpt.loader import make_loader
    kept = make_loader(char_dataset, "train", 4, 16, prepend_bos=True)
    left_out = make_loader(char_dataset, "train", 4, 16, prepend_bos=True, bos_loss=False)
    (x1, y1), (x2, y2) = kept.next_batch(), left_out.next_batch()
    assert torch.equal(x1, x2) and (x1[:, 0] == kept.bos_token).all()
    assert (y2[:, 0] == -1).all() and torch.equal(y1[:, 1:], y2[:, 1:]) and (y1[:, 0] >= 0).all()


def test_train_flags_are_type_checked(capsys):
    from sinkgpt.config import load_config
    assert load_config(flags(pos_offset=1))["pos_offset"] == 1
    with pytest.raises(Exception, match="pos_offset"):
        load_config(flags(pos_offset=-1))


# ------------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_smollm2_converts_within_float32_rounding_and_loses_its_massive_activation(tmp_path):
    from conftest import HAMLET
    from sinkgpt.explicit import layer_outliers, paired_batches
    from sinkgpt.pretrained import from_pretrained
    from sinkgpt.tokenizer import folder_tokenizer_meta, load_tokenizer
    folder = os.environ.get("SINKGPT_SMOLLM2", "data/models/SmolLM2-135M-Instruct")
    if not os.path.isdir(folder):
        pytest.fail(f"{folder} is missing: run python data/models/smollm2.py (CI does)")
    out = tmp_path / "converted"
    assert convert.main([folder, "--out_dir", str(out), "--windows", "4", "--window_tokens", "64"]) == 0
    check = json.load(open(out / "convert.json"))["check"]
    assert check["max_abs_logit_diff"] <= 1e-3
    meta = folder_tokenizer_meta(folder)
    ids = load_tokenizer(meta).encode(open(HAMLET, encoding="utf-8").read()[20000:30000])
    windows = torch.tensor([ids[i * 65:(i + 1) * 65] for i in range(2)])
    original = from_pretrained(folder).eval()
    from sinkgpt.checkpoint import load_model
    converted = load_model(str(out)).model  # loaded the way every script loads it
    with_bos, without = paired_batches(windows, meta["bos_token"])
    orig_layers, _, got = layer_outliers(original, with_bos, 1)
    conv_layers, _, _ = layer_outliers(converted, without, 0)
    # no real token meets Sun et al.'s criterion in any block; below the last block none reaches 1,000 (the last
    # block's output reaches about 1,100 at 75x its median, in the original as well)
    assert not any(e["sun"] for e in conv_layers)
    assert max(e["max_abs"] for e in conv_layers[:-1]) <= 1000
    assert got["h.11.resid_post"][:, 0].abs().max() >= 20000  # the original's BOS carries it
    assert max(e["max_abs"] for e in orig_layers) == pytest.approx(max(e["max_abs"] for e in conv_layers), rel=1e-3)


def test_convert_a_pretrained_llama_folder_and_compare(tmp_path, llama_dir, capsys):
    """A Hugging Face Llama folder (GQA, its own tokenizer.json) converts, and the comparison runs on it; the
    Llama format has no slot, so exporting the converted model is refused with one line."""
    from sinkgpt.checkpoint import load_model
    from sinkgpt.pretrained import PretrainedError, export_hf
    folder, _ = llama_dir
    out = tmp_path / "converted"
    assert convert.main([folder, "--out_dir", str(out), "--windows", "2", "--window_tokens", "30"]) == 0
    assert "converted logits equal the original's (BOS first) within" in capsys.readouterr().out
    check = json.load(open(out / "convert.json"))["check"]
    assert check["windows"] == [2, 30] and check["max_abs_logit_diff"] <= 1e-4
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    assert analyze.main(["explicit", folder, str(out), "--text", text, "--window", "8", "--tokens", "40",
                         "--n", "10", "--report", str(tmp_path / "r")]) == 0
    result = json.load(open(tmp_path / "r" / "explicit.json"))
    assert result["max_abs_logit_diff"] <= 1e-4 and len(result["writers"]) == 2
    with pytest.raises(PretrainedError, match="sink='kv_bias'"):
        export_hf(load_model(str(out)).model, str(tmp_path / "hf"))


def test_analyze_starts_measures_each_retrofits_step0_cost(tmp_path, llama_dir, capsys):
    folder, _ = llama_dir
    assert analyze.main(["starts", folder, "--text", "To be, or not to be, that is the question: whether 'tis",
                         "--report", str(tmp_path / "s")]) == 0
    costs = json.load(open(tmp_path / "s" / "starts.json"))["loss_change"]
    for exact in ("attn_gate=headwise", "attn_gate=elementwise", "sink=bos_override", "sink=token, pos_offset=1"):
        assert abs(costs[exact]) <= 1e-5, exact
    assert costs["sink=logit"] == pytest.approx(costs["sink=kv_bias"], abs=1e-6)  # both start as softmax1
    assert abs(costs["sink=logit"]) > 1e-4
