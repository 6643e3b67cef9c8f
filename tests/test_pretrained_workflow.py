"""A pretrained Llama-family folder with its own tokenizer.json through every script: the tokenizer equals
transformers', the prepare scripts write data in it, train.py continues the model (with a sink option) and refuses
data of another tokenizer, and sample.py / analyze.py work on the folder and on the continued run, the latter
without the folder beside it."""
import json
import os
import shutil

import pytest
import torch

import analyze
import sample
from conftest import make_llama_folder, run_train, shakespeare_excerpt
from sinkgpt import prep
from sinkgpt.tokenizer import folder_tokenizer_meta, load_tokenizer

STRINGS = ["Hello, world", "  two leading spaces and trailing  ", "tabs\tand\nnew\n\nlines\r\n", "a    b     c",
           "unicode: héllo wörld, naïve café, 日本語, emoji 🙂👍, math ∑∫√", "O Romeo, Romeo! wherefore art thou Romeo?",
           "<|im_start|>user\nhi<|im_end|>", "don't can't won't I'm you're", "", "1234567890 3.14159 -42"]


def auto_tokenizer(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def test_the_folder_tokenizer_encodes_and_decodes_as_transformers(llama_dir):
    folder, _ = llama_dir
    theirs = auto_tokenizer(folder)
    meta = folder_tokenizer_meta(folder)
    ours = load_tokenizer(meta)
    assert (meta["bos_token"], meta["eos_token"]) == (1, 2) and ours.vocab_size == len(theirs)
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids) == text, text


def test_prepare_with_a_folder_tokenizer_records_and_keeps_it(tmp_path, llama_dir):
    folder, _ = llama_dir
    out = tmp_path / "data"
    prep.text_prepare_main("gpt2", os.path.join(prep.REPO_ROOT, "data", "shakespeare", "prepare.py"),
                           ["--input", prep.BUNDLED_SHAKESPEARE + "/hamlet_gut.txt", prep.BUNDLED_SHAKESPEARE
                            + "/macbeth_gut.txt", "--out_dir", str(out), "--tokenizer", folder, "--val_split", "tail"])
    meta = json.load(open(out / "meta.json"))
    expected = folder_tokenizer_meta(folder)
    assert meta["tokenizer"] == "hf" and meta["tokenizer_sha256"] == expected["tokenizer_sha256"]
    assert meta["bos_token"] == 1 and meta["vocab_size"] == expected["vocab_size"] and "tokenizer_json" not in meta
    assert (out / "tokenizer.json").read_text() == expected["tokenizer_json"]
    loaded = prep.read_meta(str(out))  # the loader's view: the tokenizer itself comes with the data
    assert loaded["tokenizer_json"] == expected["tokenizer_json"]
    tokens = prep.np.fromfile(out / "train.bin", dtype=prep.np.uint16)
    assert tokens[0] == 1 and tokens.max() < expected["vocab_size"]
    text = load_tokenizer(loaded).decode(tokens[1:200].tolist())
    assert text == shakespeare_excerpt_start(text)


def shakespeare_excerpt_start(text):
    """The same characters of hamlet_gut.txt (the first document)."""
    with open(os.path.join(prep.BUNDLED_SHAKESPEARE, "hamlet_gut.txt"), encoding="utf-8") as f:
        return f.read()[:len(text)]


def hf_loss(hf, loader, batches):
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            x, y = loader.next_batch()
            logits = hf(x).logits
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    return sum(losses) / len(losses)


LLAMA_SHAPE = dict(n_layer=3, n_head=6, n_embd=48)  # the folder's own: the tiny train flags would conflict


def test_train_continues_a_llama_with_a_sink_and_samples_and_analyses_without_the_folder(tmp_path, llama_dir,
                                                                                       llama_data, capsys):
    from sinkgpt.loader import TokenLoader
    folder, hf = llama_dir
    moved = shutil.copytree(folder, tmp_path / "llama")
    out = tmp_path / "run"
    assert run_train(out, llama_data, init_from=str(moved), max_iters=0, block_size=32, eval_iters=3,
                     **LLAMA_SHAPE) == 0
    events = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val0 = [e["val_loss"] for e in events if "val_loss" in e][0]
    assert val0 == pytest.approx(hf_loss(hf, TokenLoader(llama_data, "val", 8, 32, seed=1337), 3), abs=1e-4)
    run = tmp_path / "run_kv"
    assert run_train(run, llama_data, init_from=str(moved), max_iters=8, eval_interval=8, block_size=32,
                     eval_iters=2, sink="kv_bias", learning_rate=3e-3, lr_decay_iters=8, **LLAMA_SHAPE) == 0
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["sink"] == "kv_bias" and ckpt["model_args"]["n_kv_head"] == 2
    assert ckpt["meta"]["tokenizer"] == "hf" and "tokenizer_json" in ckpt["meta"]
    shutil.rmtree(moved)  # the checkpoint carries its tokenizer: no folder needed from here on
    capsys.readouterr()
    assert sample.main(["--out_dir", str(run), "--start=To be, or not", "--max_new_tokens=5", "--num_samples=1",
                        "--seed=1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("To be, or not")  # trained without prepend_bos: no BOS first (the one rule)
    assert analyze.main([str(run), "--batches", "1", "--batch_size", "2", "--report", str(tmp_path / "report")]) == 0
    report = json.load(open(tmp_path / "report" / "report.json"))
    assert report["data"]["bos"] is False and len(report["layers"]) == 3 and report["layers"][0]["slot_mass"]
    # resume continues the run
    assert run_train(run, llama_data, init_from="resume", max_iters=10, eval_interval=10, block_size=32,
                     eval_iters=2, sink="kv_bias", learning_rate=3e-3, lr_decay_iters=10, **LLAMA_SHAPE) == 0
    assert torch.load(run / "ckpt.pt", weights_only=True)["iter_num"] == 10


def test_train_refuses_data_of_another_tokenizer(tmp_path, llama_dir, capsys):
    folder, _ = llama_dir
    other, _ = make_llama_folder(tmp_path / "other", seed=1)
    with open(os.path.join(other, "tokenizer.json")) as f:  # another tokenizer of the same size: two ids swapped
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    with open(os.path.join(other, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(shakespeare_excerpt(6000))
    (src / "b.txt").write_text(shakespeare_excerpt(12000)[6000:])
    data = str(tmp_path / "other_data")
    prep.prepare_text_dataset([str(src)], data, folder_tokenizer_meta(other), val_fraction=0.5)
    capsys.readouterr()
    assert run_train(tmp_path / "run", data, init_from=folder, max_iters=2, block_size=32, **LLAMA_SHAPE) == 1
    line = capsys.readouterr().err.strip().splitlines()
    assert len(line) == 1 and "is tokenized with the tokenizer.json of" in line[0] and f"--tokenizer {folder}" in line[0]
    gpt2_data = str(tmp_path / "gpt2_data")
    prep.prepare_text_dataset([str(src)], gpt2_data, "gpt2", val_fraction=0.5)
    assert run_train(tmp_path / "run2", gpt2_data, init_from=folder, max_iters=2, block_size=32, **LLAMA_SHAPE) == 1
    assert "vocab_size" in capsys.readouterr().err


def sample_greedy(folder, prompt, *flags):
    """sample.py's greedy text for a prompt, from a pretrained folder."""
    import io
    from contextlib import redirect_stdout
    out = io.StringIO()
    with redirect_stdout(out):
        assert sample.main(["--init_from", folder, f"--start={prompt}", "--max_new_tokens=6", "--num_samples=1",
                            "--temperature=0", *flags]) == 0
    return out.getvalue().split("\n---------------")[0]


def transformers_greedy(folder, hf, prompt, bos=None):
    """transformers' own pipeline: the folder's AutoTokenizer, generate, decode (special tokens kept)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt).input_ids
    if bos is not None:  # a forced choice, as sample.py --bos=true|false
        ids = [i for i in ids if i != hf.config.bos_token_id] if not bos else [hf.config.bos_token_id] + ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False), ids


def test_sample_tokenises_the_prompt_as_the_folder_s_own_tokenizer_and_matches_transformers(tmp_path, llama_dir):
    """Greedy output equals transformers' generate on the same folder and prompt, for a tokenizer that adds no
    BOS (SmolLM2's kind) and for one whose post-processor puts BOS in front (Llama-2/3's kind); --bos forces."""
    from tokenizers import Tokenizer, processors
    plain_folder, plain_hf = llama_dir
    text, ids = transformers_greedy(plain_folder, plain_hf, "To be")
    assert ids[0] != 1 and sample_greedy(plain_folder, "To be") == text  # no BOS in front
    assert sample_greedy(plain_folder, "To be", "--bos=true") == transformers_greedy(plain_folder, plain_hf, "To be",
                                                                                     bos=True)[0]
    bos_folder, bos_hf = make_llama_folder(tmp_path / "adds_bos", seed=1)
    tokenizer = Tokenizer.from_file(os.path.join(bos_folder, "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                             special_tokens=[("<|im_start|>", 1)])
    tokenizer.save(os.path.join(bos_folder, "tokenizer.json"))
    text, ids = transformers_greedy(bos_folder, bos_hf, "To be")
    assert ids[0] == 1 and sample_greedy(bos_folder, "To be") == text  # BOS in front, as the tokenizer puts it
    assert sample_greedy(bos_folder, "To be", "--bos=false") == transformers_greedy(bos_folder, bos_hf, "To be",
                                                                                    bos=False)[0]


def test_analyze_on_the_folder_itself_keeps_bos_first(tmp_path, llama_dir, capsys):
    folder, hf = llama_dir
    code = analyze.main([folder, "--text", "To be, or not to be, that is the question", "--report",
                         str(tmp_path / "r")])
    assert code == 0
    report = json.load(open(tmp_path / "r" / "report.json"))
    assert report["data"]["bos"] is True and report["model"]["n_kv_head"] == 2
    assert "Every probe sequence starts with the BOS token at position 0" in open(tmp_path / "r" / "report.md").read()
    for command in (["repeat", folder, "--string", "the", "--n", "12"],
                    ["attribute", folder, "--text", "To be, or not to be, that is the question", "--pos", "0"],
                    ["ablate", folder, "--text", "To be, or not to be", "--entry", "1:0:3"],
                    ["intervene", folder, "--text", "To be, or not", "--layer", "1", "--dim", "3", "--scale", "0"]):
        assert analyze.main(command) == 0, command


def test_analyze_refuses_data_in_another_tokenizer(tmp_path, llama_dir, capsys):
    folder, _ = llama_dir
    capsys.readouterr()
    assert analyze.main([folder, "--data", "shakespeare", "--batches", "1", "--report", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenized with GPT-2 BPE" in err[0]


def test_optimizer_interventions_and_tracking_act_on_a_continued_llama(tmp_path, llama_dir, llama_data):
    """moment_edits and track_params select the Llama's own parameters: the down-projection row whose first moment
    is zeroed every step keeps |m| = 0, a row left alone does not; activation tracking logs every layer."""
    folder, _ = llama_dir
    row = "transformer.h.1.mlp.c_proj.weight[3, :]"
    other = "transformer.h.1.mlp.c_proj.weight[4, :]"
    out = tmp_path / "run"
    assert run_train(out, llama_data, init_from=folder, max_iters=4, eval_interval=4, block_size=32, eval_iters=1,
                     track_interval=2, track_params=[row, other], learning_rate=1e-3, attn_gate="headwise",
                     moment_edits=[{"param": row, "moment": "m", "op": "zero", "every": 1}], **LLAMA_SHAPE) == 0
    events = [json.loads(line) for line in open(out / "metrics.jsonl")]
    tracked = [e for e in events if "track_ratio" in e]
    assert [e["iter"] for e in tracked] == [0, 2, 4] and len(tracked[0]["track_ratio"]) == 3
    assert not any(k.startswith("opt_") for k in tracked[0])  # before the first step: no optimizer state yet
    tracked = tracked[1:]
    key, other_key = row.replace(" ", ""), other.replace(" ", "")  # the log's keys carry the slice without spaces
    assert all(e[f"opt_m_norm/{key}"] == 0.0 and e[f"opt_m_norm/{other_key}"] > 0 for e in tracked)
    assert all(e[f"opt_update_norm/{key}"] > 0 for e in tracked)  # Adam still moves it (m before the edit)


def test_export_of_a_continued_llama_carries_its_tokenizer(tmp_path, llama_dir, llama_data):
    """export_hf with the checkpoint's tokenizer description: the folder loads back with the same tokenizer."""
    from sinkgpt.checkpoint import load_model
    from sinkgpt.pretrained import export_hf
    folder, _ = llama_dir
    run = tmp_path / "run"
    assert run_train(run, llama_data, init_from=folder, max_iters=2, eval_interval=2, block_size=32, eval_iters=1,
                     **LLAMA_SHAPE) == 0
    trained = load_model(str(run))
    export_hf(trained.model, str(tmp_path / "out"), meta=trained.meta)
    again = load_model(str(tmp_path / "out"))
    assert again.meta["tokenizer_sha256"] == trained.meta["tokenizer_sha256"]
    idx = torch.tensor([load_tokenizer(again.meta).encode("To be, or not to be")])
    with torch.no_grad():
        assert (again.model(idx)[0] - trained.model(idx)[0]).abs().max().item() < 1e-5


def test_stream_on_the_llama_folder_keeps_a_rolling_cache(tmp_path, llama_dir):
    folder, _ = llama_dir
    assert analyze.main(["stream", folder, "--tokens", "200", "--window", "32", "--keep", "0,4",
                         "--report", str(tmp_path / "st")]) == 0
    rows = json.load(open(tmp_path / "st" / "stream.json"))["rows"]
    assert [r["keep"] for r in rows] == [0, 4] and all(len(r["losses"]) == 199 for r in rows)
    assert all(r["route"] == "rolling cache, positions within the cache" for r in rows)
    assert [r["largest_cache"] for r in rows] == [32, 36]
