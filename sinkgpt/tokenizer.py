"""
Tokenizers for sinkgpt: GPT-2 BPE (tiktoken, with an offline fallback built from the bundled ranks file), the
character-level tokenizer of a prepared dataset's meta.json, and a pretrained folder's own tokenizer.json
(through the `tokenizers` library, the one transformers' fast tokenizers use).

    enc = gpt2_encoding()                  # tiktoken.Encoding, works without network
    tok = load_tokenizer(meta)             # meta = json.load(open("data/<name>/meta.json"))
    ids = tok.encode("To be"); text = tok.decode(ids)
    meta = folder_tokenizer_meta("data/models/SmolLM2-135M-Instruct")   # {"tokenizer": "hf", ...}

A tokenizer description (meta) is a plain dict, so datasets (meta.json) and checkpoints carry it: 'char' lists
its characters, 'gpt2' needs nothing more, 'hf' holds the whole tokenizer.json text ('tokenizer_json') or names
the file beside the dataset's meta.json ('tokenizer_file'), with its sha256 and the BOS / EOS ids.

May import: sinkgpt.common.
"""
import functools
import hashlib
import os
import socket
import tempfile
import threading

import tiktoken
import tiktoken.load

from sinkgpt.common import REPO_ROOT

BUNDLED_GPT2_RANKS = os.path.join(REPO_ROOT, "data", "gpt2_tokenizer", "gpt2.tiktoken")
GPT2_EOT = 50256
GPT2_VOCAB = GPT2_EOT + 1
EOT_TEXT = "<|endoftext|>"

# GPT-2's pre-tokenisation split pattern, in the possessive form tiktoken uses for "gpt2"
# (same matches as the original r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|..." but faster)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# the two files tiktoken fetches for "gpt2"; it caches each under sha1(url) in its cache dir
GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
GPT2_HOST = "openaipublic.blob.core.windows.net"


def _tiktoken_cache_dir():
    # mirrors tiktoken.load.read_file_cached: env overrides, else <tmp>/data-gym-cache
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _tiktoken_gpt2_cached():
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:  # "" disables tiktoken's cache: it would always download
        return False
    keys = [hashlib.sha1(url.encode()).hexdigest() for url in GPT2_URLS]
    return all(os.path.exists(os.path.join(cache_dir, k)) for k in keys)


def _run_with_timeout(fn, timeout_s):
    """fn() in a daemon thread; its result, or None if it raised or took longer than timeout_s.
    A thread because neither DNS lookups nor tiktoken's requests.get have a timeout of their own."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except Exception:
            pass

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result.get("value")


def _host_reachable(timeout_s=2.0):
    def connect():
        with socket.create_connection((GPT2_HOST, 443), timeout=timeout_s):
            return True
    return bool(_run_with_timeout(connect, timeout_s))


def offline_forced():
    """SINKGPT_OFFLINE=1: nothing is fetched (the bundled GPT-2 ranks, the local Hugging Face cache only)."""
    return os.environ.get("SINKGPT_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def bundled_gpt2_encoding(path=BUNDLED_GPT2_RANKS):
    """The GPT-2 encoding built from the bundled ranks file: identical to tiktoken's "gpt2"."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"GPT-2 ranks file not found: {path} (see data/gpt2_tokenizer/SOURCE.md)")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=tiktoken.load.load_tiktoken_bpe(path),
        special_tokens={EOT_TEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_EOT + 1,
    )


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's "gpt2" when its files are cached or downloadable within seconds, else the
    identical encoding from the bundled ranks (always, with SINKGPT_OFFLINE=1)."""
    if not offline_forced():
        if _tiktoken_gpt2_cached():
            enc = _run_with_timeout(lambda: tiktoken.get_encoding("gpt2"), 30)
        elif _host_reachable():
            # the download is ~1.5 MB; give up on a stalled connection rather than hang
            enc = _run_with_timeout(lambda: tiktoken.get_encoding("gpt2"), 30)
        else:
            enc = None
        if enc is not None:
            return enc
    return bundled_gpt2_encoding()


class CharTokenizer:
    """Character-level: id = index in the dataset's sorted character list; the last id is EOT."""
    kind = "char"

    def __init__(self, chars, bos_token):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.bos_token = int(bos_token)
        self.vocab_size = max(len(self.chars), self.bos_token) + 1

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {', '.join(repr(c) for c in unknown)}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        pieces = []
        for i in ids:
            i = int(i)
            if i == self.bos_token:
                pieces.append(EOT_TEXT)
            elif 0 <= i < len(self.chars):
                pieces.append(self.chars[i])
            else:
                raise ValueError(f"token id {i} out of range for a vocabulary of {self.vocab_size}")
        return "".join(pieces)


class GPT2Tokenizer:
    """GPT-2 BPE. encode() accepts a literal <|endoftext|> (so a prompt can start a document)."""
    kind = "gpt2"

    def __init__(self, encoding=None):
        self.encoding = encoding or gpt2_encoding()
        self.bos_token = self.encoding.eot_token
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={EOT_TEXT})

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range for a vocabulary of {self.vocab_size}")
        return self.encoding.decode(ids)


def read_text_argument(text, what="text"):
    """A command-line text: the text itself, or FILE:path for a file's contents. ValueError (one line) for a
    missing file or an empty text; sample.py and analyze.py turn it into their own error line."""
    if text.startswith("FILE:"):
        path = text[len("FILE:"):]
        if not os.path.isfile(path):
            raise ValueError(f"{what} file {path} " + ("is a folder" if os.path.isdir(path) else "does not exist"))
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if not text:
        raise ValueError(f"the {what} is empty")
    return text


class HFTokenizer:
    """A pretrained folder's tokenizer.json, through the `tokenizers` library. encode() adds no special tokens
    (BOS is placed by the caller's BOS rule); decode() keeps them, like GPT2Tokenizer."""
    kind = "hf"

    def __init__(self, tokenizer_json, bos_token, eos_token=None, clean_up_spaces=False):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.bos_token, self.eos_token = int(bos_token), eos_token
        self.clean_up_spaces = clean_up_spaces
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def adds_bos(self):
        """Whether the folder's tokenizer puts BOS in front of a text it encodes (its post-processor), as
        transformers' tokenizer(text) does; most GPT-2 and SmolLM2 folders do not, Llama-2/3 folders do."""
        ids = self.tokenizer.encode("a", add_special_tokens=True).ids
        return len(ids) > len(self.encode("a")) and ids[0] == self.bos_token

    def encode_batch(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range for a vocabulary of {self.vocab_size}")
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return clean_up_tokenization(text) if self.clean_up_spaces else text


def clean_up_tokenization(text):
    """transformers' clean_up_tokenization_spaces: no space before punctuation and in English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def read_json_file(path):
    import json
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None


def special_ids(config):
    """(BOS, EOS) ids of a Hugging Face config.json (a dict): the first EOS of a list; BOS falls back to EOS, the
    usual document separator, when it is absent or null (None when neither is given)."""
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    bos = config.get("bos_token_id")
    return (eos if bos is None else bos), eos


GPT2_PROBE_TEXT = "Hello, world! <|endoftext|>  naïve café 日本語 🙂\n\n\tdon't 3.14159"


def is_gpt2_bpe(meta):
    """Whether an 'hf' description is GPT-2's own BPE (a full GPT-2 folder ships one): same size, same ids."""
    if meta.get("tokenizer") != "hf" or meta.get("vocab_size") != GPT2_VOCAB:
        return False
    return load_tokenizer(meta).encode(GPT2_PROBE_TEXT) == GPT2Tokenizer().encode(GPT2_PROBE_TEXT)


def folder_tokenizer_meta(folder):
    """The tokenizer description of a pretrained folder with a tokenizer.json: the file's text and sha256, and
    the BOS / EOS ids of its config.json (BOS falls back to EOS, the usual document separator). ValueError for a
    folder without them."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no tokenizer.json")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    config = read_json_file(os.path.join(folder, "config.json")) if os.path.isfile(
        os.path.join(folder, "config.json")) else {}
    options = read_json_file(os.path.join(folder, "tokenizer_config.json")) if os.path.isfile(
        os.path.join(folder, "tokenizer_config.json")) else {}
    bos, eos = special_ids(config)
    if bos is None:
        raise ValueError(f"{folder}/config.json names neither a bos_token_id nor an eos_token_id")
    tokenizer = HFTokenizer(text, bos, eos)
    return {"tokenizer": "hf", "tokenizer_json": text, "tokenizer_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "bos_token": int(bos), "eos_token": eos, "vocab_size": tokenizer.vocab_size,
            "clean_up_tokenization_spaces": bool(options.get("clean_up_tokenization_spaces", False)),
            "tokenizer_source": os.path.abspath(folder)}


def tokenizer_identity(meta):
    """What makes two tokenizer descriptions the same tokenizer: ids mean the same text under both."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return ("char", tuple(meta.get("chars", ())), meta.get("bos_token"))
    if kind == "hf":
        return ("hf", meta.get("tokenizer_sha256"), meta.get("bos_token"))
    return (kind,)


def describe_tokenizer(meta):
    kind = meta.get("tokenizer")
    if kind == "hf":
        return (f"the tokenizer.json of {meta.get('tokenizer_source', '?')} (sha256 "
                f"{meta.get('tokenizer_sha256', '?')[:12]}, BOS {meta.get('bos_token')})")
    if kind == "char":
        chars = "".join(meta.get("chars", []))
        return f"a character vocabulary of {len(chars)} ({chars[:12]!r}...)"
    return {"gpt2": "GPT-2 BPE"}.get(kind, repr(kind))


def load_tokenizer(meta):
    """The tokenizer described by a prepared dataset's meta.json or a checkpoint's meta (a dict)."""
    kind = meta.get("tokenizer")
    if kind == "char":
        if "chars" not in meta or "bos_token" not in meta:
            raise ValueError("char meta.json needs 'chars' and 'bos_token'")
        return CharTokenizer(meta["chars"], meta["bos_token"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "hf":
        if "tokenizer_json" not in meta:
            raise ValueError("an 'hf' tokenizer description needs 'tokenizer_json' (the tokenizer.json text)")
        return HFTokenizer(meta["tokenizer_json"], meta["bos_token"], meta.get("eos_token"),
                           meta.get("clean_up_tokenization_spaces", False))
    raise ValueError(f"unsupported tokenizer {kind!r} in meta.json (supported: char, gpt2, hf)")
