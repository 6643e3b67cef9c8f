"""GPT-2 encoding (online or from the bundled ranks) and the tokenizers built from meta.json."""
import glob
import os
import sys

import pytest
import tiktoken
import tiktoken.load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from sinkgpt import tokenizer  # noqa: E402

# the pattern as published with GPT-2 (tiktoken uses an equivalent, faster possessive form)
ORIGINAL_GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("SINKGPT_OFFLINE", "1")
    tokenizer.gpt2_encoding.cache_clear()
    yield
    tokenizer.gpt2_encoding.cache_clear()


def corpus_sample(n_chars=300_000):
    files = sorted(glob.glob(os.path.join(REPO, "data", "shakespeare", "corpus", "*.txt")))
    text = "".join(open(f, encoding="utf-8").read() for f in files[:6])
    extras = "\n\n  It's 3.14 o'clock -- naïve café, 日本語, 😀!!\t\tTabs\r\n  trailing   \n\n\n"
    return text[:n_chars] + extras * 20


def test_hello_world_offline(offline):
    enc = tokenizer.gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_offline_well_known_ids(offline):
    enc = tokenizer.gpt2_encoding()
    assert enc.encode_ordinary("\n") == [198]
    assert enc.encode_ordinary("\n\n") == [628]
    assert enc.encode_ordinary(" ") == [220]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("The") == [464]
    assert enc.encode_ordinary(",") == [11] and enc.encode_ordinary(".") == [13]


def test_offline_matches_original_split_pattern(offline):
    # the bundled ranks under GPT-2's published pattern: same tokens as our (tiktoken's) pattern
    enc = tokenizer.gpt2_encoding()
    reference = tiktoken.Encoding(
        name="gpt2_reference", pat_str=ORIGINAL_GPT2_PAT,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(tokenizer.BUNDLED_GPT2_RANKS),
        special_tokens={"<|endoftext|>": 50256})
    text = corpus_sample()
    ids = enc.encode_ordinary(text)
    assert ids == reference.encode_ordinary(text)
    assert enc.decode(ids) == text


def test_unreachable_network_falls_back_quickly(monkeypatch, tmp_path):
    monkeypatch.delenv("SINKGPT_OFFLINE", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: tiktoken would download
    monkeypatch.setattr(tokenizer, "GPT2_HOST", "sinkgpt-no-such-host.invalid")
    tokenizer.gpt2_encoding.cache_clear()
    try:
        enc = tokenizer.gpt2_encoding()
        assert enc.encode("Hello world") == [15496, 995]
    finally:
        tokenizer.gpt2_encoding.cache_clear()


def test_char_tokenizer_round_trip_and_errors():
    chars = sorted(set("hello world\n"))
    tok = tokenizer.load_tokenizer({"tokenizer": "char", "chars": chars, "bos_token": len(chars),
                                    "vocab_size": len(chars) + 1})
    assert tok.kind == "char" and tok.vocab_size == len(chars) + 1 and tok.bos_token == len(chars)
    ids = tok.encode("hello\nworld")
    assert ids == [chars.index(c) for c in "hello\nworld"]
    assert tok.decode(ids) == "hello\nworld"
    assert tok.decode([tok.bos_token] + ids[:2]) == "<|endoftext|>he"
    with pytest.raises(ValueError, match=r"'Z', 'x'"):
        tok.encode("xhelloZ")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([len(chars) + 5])


def test_gpt2_tokenizer_from_meta(offline):
    tok = tokenizer.load_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257, "bos_token": 50256})
    assert tok.kind == "gpt2" and tok.bos_token == 50256 and tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>Hello world") == [50256, 15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"


def test_unknown_tokenizer_kind():
    with pytest.raises(ValueError, match="unsupported tokenizer"):
        tokenizer.load_tokenizer({"tokenizer": "sentencepiece", "vocab_size": 10, "bos_token": 9})


def test_text_argument_file_errors_say_what_is_wrong(tmp_path):
    from sinkgpt.tokenizer import read_text_argument
    with pytest.raises(ValueError, match="prompt file .* is a folder"):
        read_text_argument(f"FILE:{tmp_path}", "prompt")
    with pytest.raises(ValueError, match="prompt file .* does not exist"):
        read_text_argument(f"FILE:{tmp_path / 'none.txt'}", "prompt")
    (tmp_path / "p.txt").write_text("Hello")
    assert read_text_argument(f"FILE:{tmp_path / 'p.txt'}", "prompt") == "Hello"
