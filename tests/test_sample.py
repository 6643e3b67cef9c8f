"""sample.py: reproducible sampling, prompts (text, FILE:, bad characters, empty, too long), bad checkpoints,
and sampling straight from a GPT-2 directory."""
import pytest
import torch

import sample
from conftest import run_train
from sinkgpt.checkpoint import load_checkpoint, model_from_checkpoint

SEP = "---------------\n"


@pytest.fixture(scope="module")
def trained_out(tmp_path_factory, char_dataset):
    out = tmp_path_factory.mktemp("sample_run") / "out"
    assert run_train(out, char_dataset, max_iters=30, eval_interval=30, lr_decay_iters=30) == 0
    return str(out)


def run_sample(capsys, *argv):
    """(exit code, list of texts, stderr) of sample.main."""
    capsys.readouterr()
    code = sample.main(["--device=cpu", *argv])
    captured = capsys.readouterr()
    texts = [t[:-1] if t.endswith("\n") else t for t in captured.out.split(SEP) if t.strip()]
    return code, texts, captured.err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    return lines[0]


def test_same_seed_same_text_and_different_seed_different_text(trained_out, capsys):
    args = ["--out_dir", trained_out, "--start=To be", "--max_new_tokens=40", "--num_samples=2",
            "--temperature=2.0", "--top_k=0"]
    code, first, _ = run_sample(capsys, *args, "--seed=1")
    assert code == 0 and len(first) == 2
    code, again, _ = run_sample(capsys, *args, "--seed=1")
    assert again == first
    code, other, _ = run_sample(capsys, *args, "--seed=2")
    assert other != first
    assert first[0] != first[1]  # the samples of one call differ (one generator, advancing)
    for text in first + other:  # the prompt, then 40 tokens (a char each, or the 13-char end-of-text marker)
        assert text.startswith("To be")
        assert len(text) - 12 * text.count("<|endoftext|>") == len("To be") + 40


def test_cache_and_no_cache_sample_the_same_greedy_text(trained_out, capsys):
    args = ["--out_dir", trained_out, "--start=KING:", "--max_new_tokens=50", "--num_samples=1", "--temperature=0"]
    code, cached, _ = run_sample(capsys, *args)
    assert code == 0
    code, uncached, _ = run_sample(capsys, *args, "--no_cache")
    assert code == 0 and cached == uncached


def test_greedy_text_is_the_models_argmax(trained_out, capsys):
    from sinkgpt.tokenizer import load_tokenizer
    code, texts, _ = run_sample(capsys, "--out_dir", trained_out, "--start=The ", "--max_new_tokens=10",
                                "--num_samples=1", "--temperature=0")
    assert code == 0
    ckpt = load_checkpoint(f"{trained_out}/ckpt.pt")
    model = model_from_checkpoint(ckpt).eval()
    tok = load_tokenizer(ckpt["meta"])
    ids = tok.encode("The ")
    with torch.no_grad():
        for _ in range(10):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert texts == [tok.decode(ids)]


def test_file_prompt(trained_out, capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("HAMLET:\nTo be, or not", encoding="utf-8")
    code, texts, _ = run_sample(capsys, "--out_dir", trained_out, f"--start=FILE:{prompt}", "--max_new_tokens=5",
                                "--num_samples=1")
    assert code == 0 and texts[0].startswith("HAMLET:\nTo be, or not")
    code, _, err = run_sample(capsys, "--out_dir", trained_out, f"--start=FILE:{tmp_path / 'missing.txt'}")
    assert code == 1 and "missing.txt" in one_error_line(err)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_sample(capsys, "--out_dir", trained_out, f"--start=FILE:{empty}")
    assert code == 1 and "empty" in one_error_line(err)


def test_characters_outside_the_vocabulary(trained_out, capsys):
    code, texts, err = run_sample(capsys, "--out_dir", trained_out, "--start=caf\u00e9 \u20ac", "--max_new_tokens=5")
    assert code == 1 and texts == []
    line = one_error_line(err)
    assert "\u20ac" in line and "vocabulary" in line


def test_empty_prompt_is_an_error(trained_out, capsys):
    code, texts, err = run_sample(capsys, "--out_dir", trained_out, "--start=", "--max_new_tokens=5")
    assert code == 1 and texts == []
    assert "empty" in one_error_line(err)


def test_no_prompt_starts_from_bos(trained_out, capsys):
    code, texts, _ = run_sample(capsys, "--out_dir", trained_out, "--max_new_tokens=8", "--num_samples=1")
    assert code == 0 and texts[0].startswith("<|endoftext|>")


def test_long_prompt_is_cropped_with_a_warning(trained_out, capsys):
    prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind"  # > block_size 32
    code, texts, err = run_sample(capsys, "--out_dir", trained_out, f"--start={prompt}", "--max_new_tokens=6",
                                  "--num_samples=1", "--temperature=0")
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "31" in lines[0]
    assert texts[0].startswith(prompt[-31:]) and len(texts[0]) == 31 + 6


@pytest.mark.parametrize("flag,words", [("--top_p=0", "--top_p"), ("--top_p=1.5", "--top_p"),
                                        ("--temperature=-1", "--temperature"), ("--max_new_tokens=-3", "--max_new_tokens"),
                                        ("--num_samples=0", "--num_samples"), ("--top_k=-1", "--top_k"),
                                        ("--dtype=foo", "--dtype"), ("--device=foo", "not a device name")])
def test_unusable_sampling_flag_is_one_clear_error(trained_out, capsys, flag, words):
    code, texts, err = run_sample(capsys, "--out_dir", trained_out, "--max_new_tokens=4", flag)
    assert code == 1 and texts == []
    assert words in one_error_line(err)


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_sample(capsys, "--out_dir", str(tmp_path / "nothing"))
    assert code == 1 and "no checkpoint" in one_error_line(err)


def test_corrupted_and_truncated_checkpoints(trained_out, capsys, tmp_path):
    with open(f"{trained_out}/ckpt.pt", "rb") as f:
        data = f.read()
    for name, content in (("truncated", data[: len(data) // 3]), ("garbage", b"\x00\x01 not a zip" * 50)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "ckpt.pt").write_bytes(content)
        code, _, err = run_sample(capsys, "--out_dir", str(folder))
        assert code == 1 and "ckpt.pt" in one_error_line(err)


def test_checkpoint_without_model_args_is_one_clear_error(trained_out, capsys, tmp_path):
    ckpt = torch.load(f"{trained_out}/ckpt.pt", weights_only=True)
    del ckpt["model_args"]
    (tmp_path / "bad").mkdir()
    torch.save(ckpt, tmp_path / "bad" / "ckpt.pt")
    code, _, err = run_sample(capsys, "--out_dir", str(tmp_path / "bad"))
    assert code == 1 and "model_args" in one_error_line(err)


def test_sample_from_a_gpt2_directory(tmp_path, capsys):
    from conftest import random_gpt2
    hf = random_gpt2(seed=2, vocab_size=50257, n_embd=16, n_head=2, n_layer=2, n_positions=32,
                     bos_token_id=50256, eos_token_id=50256)
    hf.save_pretrained(str(tmp_path / "gpt2"))
    code, texts, err = run_sample(capsys, "--init_from", str(tmp_path / "gpt2"), "--start=Hello, world",
                                  "--max_new_tokens=6", "--num_samples=2", "--seed=3")
    assert code == 0, err
    # transformers' GPT-2 tokenizer adds no BOS, so neither does sample.py on a GPT-2 folder
    assert len(texts) == 2 and all(t.startswith("Hello, world") for t in texts)
    code, again, _ = run_sample(capsys, "--init_from", str(tmp_path / "gpt2"), "--start=Hello, world",
                                "--max_new_tokens=6", "--num_samples=2", "--seed=3")
    assert again == texts
    # greedy: the tokens transformers' generate picks, with and without a forced BOS
    from sinkgpt.tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer()
    for flag, prefix in (("--bos=auto", []), ("--bos=true", [tok.bos_token])):
        ids = torch.tensor([prefix + tok.encode("Hello, world")])
        with torch.no_grad():
            expected = hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
        code, greedy, _ = run_sample(capsys, "--init_from", str(tmp_path / "gpt2"), "--start=Hello, world",
                                     "--max_new_tokens=4", "--num_samples=1", "--temperature=0", flag)
        assert code == 0 and greedy == [tok.decode(expected[0].tolist())], flag


def test_init_from_a_missing_gpt2_directory(tmp_path, capsys):
    code, _, err = run_sample(capsys, "--init_from", str(tmp_path / "nope"))
    assert code == 1
    assert "nope" in one_error_line(err)


def test_dtype_is_the_weights_dtype_loaded_straight_in_it(trained_out, capsys, monkeypatch):
    """--dtype=bfloat16 loads the weights in bfloat16 (no float32 model and autocast); greedy text stays the
    float32 model's for the first tokens at least (a 40-token char model, bf16 rounding)."""
    loaded = []
    original = sample.load_model
    monkeypatch.setattr(sample, "load_model", lambda *a: loaded.append(a[2]) or original(*a))
    args = ["--out_dir", trained_out, "--start=KING:", "--max_new_tokens=8", "--num_samples=1", "--temperature=0"]
    code, low, _ = run_sample(capsys, *args, "--dtype=bfloat16")
    assert code == 0 and loaded == [torch.bfloat16]
    code, full, _ = run_sample(capsys, *args)
    assert code == 0 and loaded == [torch.bfloat16, torch.float32]
    assert low[0].startswith("KING:") and len(low[0]) == len(full[0])
