"""
Shared code of the data/<name>/prepare.py scripts.

Every prepared dataset is a folder holding
    meta.json                      vocab_size, bos_token, tokenizer, token counts, shard names, source
    train.bin / val.bin            uint16 token streams (or train_000.bin, train_001.bin, ... shards)
    <shard>.docs.npy               int64 positions of the EOT tokens that start each document
Each document is preceded by the end-of-text token (bos_token), so the stream reads
[EOT doc1 EOT doc2 ...]. All files are written atomically, meta.json last: a folder with a
meta.json is complete.

May import: sinkgpt.common, sinkgpt.tokenizer.
"""
import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

from sinkgpt.common import REPO_ROOT

BUNDLED_SHAKESPEARE = os.path.join(REPO_ROOT, "data", "shakespeare", "corpus")
# prepared from the bundled corpus on first use: name -> (tokenizer, val_split); shakespeare_char_tail is
# nanoGPT's split (the last 10% of the concatenated works), for loss comparisons with nanoGPT
BUNDLED_DATASETS = {"shakespeare_char": ("char", "documents"), "shakespeare": ("gpt2", "documents"),
                    "shakespeare_char_tail": ("char", "tail"),
                    # in SmolLM2's own tokenizer, once data/models/smollm2.py has fetched the model
                    "shakespeare_smollm2": ("data/models/SmolLM2-135M-Instruct", "documents")}
DEFAULT_VAL_FRACTION = 0.1
MIN_DOCS_FOR_DOC_SPLIT = 10  # fewer documents than this: hold out a span of each instead
TOKEN_DTYPE = np.uint16
SHARD_FILE_RE = re.compile(r"^(train|val)(_\d+)?\.(bin|docs\.npy)$")
DATA_EXTENSIONS = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


# ---------------------------------------------------------------------------------------------
# files

def display_path(path):
    """Repo-relative where possible: shorter in messages and in meta.json's source."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO_ROOT)
    return path if rel.startswith("..") else rel


def atomic_write(path, write_fn):
    """write_fn(file) into a temp file next to path, then rename: never a half-written path."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_tokens(path, tokens):
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"token id {int(tokens.max())} does not fit in uint16")
    atomic_write(path, lambda f: f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes()))


def write_doc_index(path, starts):
    atomic_write(path, lambda f: np.save(f, np.asarray(starts, dtype=np.int64)))


def doc_index_path(bin_path):
    return bin_path[: -len(".bin")] + ".docs.npy"


def write_meta(out_dir, meta):
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(os.path.join(out_dir, "meta.json"), lambda f: f.write(text.encode()))


def start_output(out_dir):
    """Create out_dir and drop an old meta.json first, so an interrupted run reads as unprepared."""
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)


def remove_stale_shards(out_dir, keep):
    """Delete token/index files of an earlier prepare (e.g. more shards) not written this time."""
    keep = set(keep) | {doc_index_path(name) for name in keep}
    for name in os.listdir(out_dir):
        if SHARD_FILE_RE.match(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def prepare_command(data_dir):
    name = os.path.basename(os.path.normpath(data_dir))
    script = os.path.join(REPO_ROOT, "data", name, "prepare.py")
    if os.path.exists(script):
        return f"python {display_path(script)}"
    return "the matching data/<name>/prepare.py"


def read_meta(data_dir):
    """meta.json of a prepared dataset, with an error naming the prepare command if absent."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no prepared dataset in {display_path(data_dir)} (meta.json missing): run {prepare_command(data_dir)}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{display_path(path)} is not valid JSON ({e}): rerun {prepare_command(data_dir)}") from None
    missing = [k for k in ("vocab_size", "bos_token", "tokenizer") if k not in meta]
    if missing:
        raise ValueError(f"{display_path(path)} lacks {', '.join(missing)}: rerun {prepare_command(data_dir)}")
    if meta["tokenizer"] == "hf" and "tokenizer_json" not in meta:  # the tokenizer.json the data was made with
        tokenizer_path = os.path.join(data_dir, meta.get("tokenizer_file", "tokenizer.json"))
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(f"{display_path(tokenizer_path)} is missing: rerun {prepare_command(data_dir)}")
        with open(tokenizer_path, encoding="utf-8") as f:
            meta["tokenizer_json"] = f.read()
    return meta


# ---------------------------------------------------------------------------------------------
# documents and the train/val split

def check_val_fraction(val_fraction):
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    return val_fraction


def list_input_files(paths, extensions=DATA_EXTENSIONS):
    """Files named by paths, folders expanded to their matching files in sorted order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                           for name in names if name.endswith(extensions))
            if not found:
                raise FileNotFoundError(f"no {'/'.join(extensions)} files in {path}")
            files += found
        elif os.path.isfile(path):
            if not path.endswith(extensions):
                raise ValueError(f"unsupported input {path} (expected {', '.join(extensions)} or a folder)")
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def read_text_file(path):
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n becomes \n
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_documents(paths):
    """One document per .txt file, folders in sorted order; empty files are skipped."""
    docs = [read_text_file(path) for path in list_input_files(paths, (".txt",))]
    return [doc for doc in docs if doc]


def is_val_doc(doc_index, val_fraction):
    # every k-th document, the first one kept for training; stable across runs and machines
    every = max(2, round(1 / val_fraction))
    return doc_index % every == every - 1


def split_point(text, val_fraction):
    """Where the held-out tail of one document starts: at a line start near the target."""
    target = int(len(text) * (1 - val_fraction))
    newline = text.rfind("\n", 0, target)
    if newline <= 0:
        newline = text.find("\n", target)
    cut = newline + 1 if newline >= 0 else target
    return cut if 0 < cut < len(text) else target


def split_documents(docs, val_fraction):
    """(train_docs, val_docs, how): whole documents held out if there are enough, else the
    last val_fraction of each document (each held-out span becomes a val document)."""
    check_val_fraction(val_fraction)
    if len(docs) >= MIN_DOCS_FOR_DOC_SPLIT:
        train = [d for i, d in enumerate(docs) if not is_val_doc(i, val_fraction)]
        val = [d for i, d in enumerate(docs) if is_val_doc(i, val_fraction)]
        return train, val, "documents"
    train, val = [], []
    for doc in docs:
        cut = split_point(doc, val_fraction)
        train += [doc[:cut]] if doc[:cut] else []
        val += [doc[cut:]] if doc[cut:] else []
    return train, val, "spans"


# ---------------------------------------------------------------------------------------------
# tokenised streams of small corpora (one train.bin and one val.bin)

def char_vocab(docs):
    return sorted(set("".join(docs)))


def char_ids(text, chars):
    """Vectorised char -> id: chars is sorted by code point, so the id is a searchsorted."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.array([ord(c) for c in chars], dtype=np.uint32)
    ids = np.searchsorted(vocab_codes, codes)
    if codes.size and (ids.max() >= len(chars) or (vocab_codes[np.minimum(ids, len(chars) - 1)] != codes).any()):
        raise ValueError("text contains characters outside the vocabulary")
    return ids


def documents_to_stream(token_lists, bos_token):
    """Concatenate documents, each preceded by bos_token; also return the bos positions."""
    lengths = np.array([len(t) + 1 for t in token_lists], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    stream = np.empty(int(lengths.sum()), dtype=TOKEN_DTYPE)
    for start, tokens in zip(starts, token_lists):
        stream[start] = bos_token
        stream[start + 1: start + 1 + len(tokens)] = tokens
    return stream, starts


def tokenizer_fields(tokenizer):
    """meta.json's tokenizer fields for 'gpt2' or an 'hf' description (sinkgpt.tokenizer.folder_tokenizer_meta);
    an 'hf' tokenizer.json itself goes into the dataset's folder beside meta.json (write_tokenizer_file)."""
    if isinstance(tokenizer, dict):
        if tokenizer["vocab_size"] > np.iinfo(TOKEN_DTYPE).max + 1:
            raise ValueError(f"the tokenizer has {tokenizer['vocab_size']} tokens: its ids do not fit the uint16 "
                             "token files")
        fields = {k: tokenizer[k] for k in ("tokenizer", "tokenizer_sha256", "bos_token", "eos_token", "vocab_size",
                                            "clean_up_tokenization_spaces", "tokenizer_source")}
        return dict(fields, tokenizer_file="tokenizer.json")
    if tokenizer == "gpt2":
        from sinkgpt.tokenizer import gpt2_encoding
        enc = gpt2_encoding()
        return {"vocab_size": enc.n_vocab, "bos_token": enc.eot_token, "tokenizer": "gpt2"}
    raise ValueError(f"unknown tokenizer {tokenizer!r} (expected char, gpt2 or a pretrained folder's tokenizer)")


def batch_encoder(tokenizer, threads=True):
    """texts -> token id lists, for 'gpt2' or an 'hf' description (no special tokens: documents are separated by
    the dataset's BOS token). threads=False keeps each call on one thread (for worker processes, which are the
    parallelism already)."""
    if isinstance(tokenizer, dict):
        if not threads:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read when the tokenizers library first encodes
        from sinkgpt.tokenizer import load_tokenizer
        return load_tokenizer(tokenizer).encode_batch
    from sinkgpt.tokenizer import gpt2_encoding
    enc = gpt2_encoding()
    return enc.encode_ordinary_batch if threads else (lambda texts: [enc.encode_ordinary(t) for t in texts])


def write_tokenizer_file(out_dir, tokenizer):
    """An 'hf' dataset keeps the tokenizer.json it was made with (the loader reads it into its meta, so
    checkpoints carry it)."""
    if isinstance(tokenizer, dict):
        text = tokenizer["tokenizer_json"].encode()
        atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda f: f.write(text))


def make_encoder(tokenizer, docs):
    """(encode_docs, vocab fields for meta.json) for 'char' (vocab from docs), 'gpt2' or an 'hf' description."""
    if tokenizer == "char":
        chars = char_vocab(docs)
        return (lambda texts: [char_ids(t, chars) for t in texts],
                {"vocab_size": len(chars) + 1, "bos_token": len(chars), "tokenizer": "char", "chars": chars})
    fields = tokenizer_fields(tokenizer)
    return batch_encoder(tokenizer), fields


def tail_split(stream, starts, val_fraction):
    """nanoGPT's split: the last val_fraction of the concatenated stream is val (a fixed span, which may start
    inside a document; that position counts as a document start in the val index)."""
    cut = int(len(stream) * (1 - val_fraction))
    val_starts = np.union1d([0], starts[starts >= cut] - cut)
    return {"train": (stream[:cut], starts[starts < cut]), "val": (stream[cut:], val_starts)}


def prepare_text_dataset(inputs, out_dir, tokenizer, val_fraction=DEFAULT_VAL_FRACTION, source=None,
                         val_split="documents"):
    """Tokenise .txt documents into out_dir/{train,val}.bin (+ .docs.npy) and meta.json. val_split: "documents"
    holds out whole documents (or each document's tail when there are few); "tail" holds out the last
    val_fraction of the concatenated corpus, in file order, as nanoGPT does."""
    if val_split not in ("documents", "tail"):
        raise ValueError(f"--val_split must be documents or tail, got {val_split!r}")
    docs = read_documents(inputs)
    if not docs:
        raise ValueError(f"no text found in {', '.join(inputs)}")
    if val_split == "tail":
        check_val_fraction(val_fraction)
        encode_docs, meta = make_encoder(tokenizer, docs)
        splits = tail_split(*documents_to_stream(encode_docs(docs), meta["bos_token"]), val_fraction)
        how = "tail"
    else:
        train_docs, val_docs, how = split_documents(docs, val_fraction)
        if not val_docs or not train_docs:
            raise ValueError("the corpus is too small to split into train and val")
        encode_docs, meta = make_encoder(tokenizer, train_docs + val_docs)
        splits = {split: documents_to_stream(encode_docs(split_docs), meta["bos_token"])
                  for split, split_docs in (("train", train_docs), ("val", val_docs))}
    start_output(out_dir)
    for split, (stream, starts) in splits.items():
        if not stream.size:
            raise ValueError("the corpus is too small to split into train and val")
        write_tokens(os.path.join(out_dir, f"{split}.bin"), stream)
        write_doc_index(os.path.join(out_dir, f"{split}.docs.npy"), starts)
        meta[f"{split}_tokens"], meta[f"{split}_docs"] = int(stream.size), len(starts)
    remove_stale_shards(out_dir, ["train.bin", "val.bin"])
    write_tokenizer_file(out_dir, tokenizer)
    meta.update(val_fraction=val_fraction, val_split=how, shards={"train": ["train.bin"], "val": ["val.bin"]},
                source=source or f"{', '.join(display_path(p) for p in inputs)} ({len(docs)} documents)")
    write_meta(out_dir, meta)
    return meta


def text_prepare_main(tokenizer, script_file, argv=None):
    """Command line of data/shakespeare_char/prepare.py and data/shakespeare/prepare.py."""
    parser = argparse.ArgumentParser(description=f"Prepare .txt documents as a {tokenizer}-level dataset.")
    parser.add_argument("--input", nargs="+", default=[BUNDLED_SHAKESPEARE],
                        help=".txt files or folders of them, one document per file (default: bundled Shakespeare)")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(script_file)))
    parser.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION)
    parser.add_argument("--val_split", choices=("documents", "tail"), default="documents",
                        help="documents: hold out whole documents (default); tail: the last val_fraction of the "
                             "concatenated corpus, as nanoGPT does")
    if tokenizer != "char":
        add_tokenizer_arg(parser)
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        chosen = tokenizer if tokenizer == "char" else resolve_tokenizer(args.tokenizer)
        meta = prepare_text_dataset(args.input, args.out_dir, chosen, args.val_fraction, val_split=args.val_split)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print_summary(args.out_dir, meta, time.time() - t0)


def add_tokenizer_arg(parser):
    parser.add_argument("--tokenizer", default="gpt2",
                        help="gpt2 (GPT-2 BPE), or a pretrained folder whose tokenizer.json to use (e.g. "
                             "data/models/SmolLM2-135M-Instruct), for continued training of that model")


def resolve_tokenizer(spec):
    """'gpt2', or the 'hf' description of a pretrained folder's tokenizer.json."""
    if spec == "gpt2":
        return spec
    from sinkgpt.tokenizer import folder_tokenizer_meta
    if not os.path.isdir(spec):
        raise ValueError(f"--tokenizer {spec}: neither gpt2 nor a folder")
    return folder_tokenizer_meta(spec)


def print_summary(out_dir, meta, seconds):
    held_out = {"documents": "whole documents", "spans": "the tail of each document",
                "tail": "the tail of the concatenated corpus"}[meta["val_split"]]
    print(f"source: {meta['source']}")
    print(f"{meta['train_docs']:,} train / {meta['val_docs']:,} val documents (val = {held_out}, "
          f"val_fraction {meta['val_fraction']})")
    print(f"tokenizer {meta['tokenizer']}, vocab_size {meta['vocab_size']:,}, bos/EOT token {meta['bos_token']}")
    for split in ("train", "val"):
        print(f"{split}: {meta[f'{split}_tokens']:,} tokens in {', '.join(meta['shards'][split])}")
    print(f"wrote {display_path(out_dir)}/meta.json in {seconds:.1f}s")


# ---------------------------------------------------------------------------------------------
# bundled datasets, prepared on demand

def resolve_data_dir(dataset, data_root="data"):
    """data_root/dataset; a relative data_root that does not exist here is taken from the repo."""
    if not os.path.isabs(data_root) and not os.path.isdir(data_root):
        data_root = os.path.join(REPO_ROOT, data_root)
    return os.path.join(data_root, dataset)


@contextlib.contextmanager
def prepare_lock(data_dir):
    """Exclusive lock on data_dir while preparing: DDP ranks starting together prepare it once."""
    os.makedirs(data_dir, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        yield
        return
    with open(os.path.join(data_dir, ".prepare.lock.tmp"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_prepared(dataset_name, data_root="data", tokenizer=None):
    """Folder of a prepared dataset; prepares the bundled Shakespeare ones if meta.json is missing. With an 'hf'
    tokenizer description, the bundled Shakespeare in that tokenizer: data/shakespeare-<sha256[:12]>-bos<id>."""
    if tokenizer is not None:  # named by what makes the tokenizer itself: its file and its BOS
        dataset_name = f"shakespeare-{tokenizer['tokenizer_sha256'][:12]}-bos{tokenizer['bos_token']}"
    data_dir = resolve_data_dir(dataset_name, data_root)
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        return data_dir
    if dataset_name not in BUNDLED_DATASETS and tokenizer is None:
        read_meta(data_dir)  # raises the FileNotFoundError naming the prepare command
    with prepare_lock(data_dir):
        if os.path.exists(meta_path):  # another process prepared it while we waited
            return data_dir
        t0 = time.time()
        tokenizer, val_split = BUNDLED_DATASETS[dataset_name] if tokenizer is None else (tokenizer, "documents")
        if tokenizer not in ("char", "gpt2") and not isinstance(tokenizer, dict):  # a pretrained folder's tokenizer
            folder = os.path.join(REPO_ROOT, tokenizer)
            if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
                raise FileNotFoundError(f"{dataset_name} needs the model's tokenizer in {tokenizer}: run python "
                                        f"data/models/smollm2.py first")
            tokenizer = resolve_tokenizer(folder)
        meta = prepare_text_dataset([BUNDLED_SHAKESPEARE], data_dir, tokenizer, val_split=val_split)
    print(f"prepared {display_path(data_dir)} from the bundled corpus (meta.json was missing): "
          f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"vocab {meta['vocab_size']:,}, {time.time() - t0:.1f}s")
    return data_dir


# ---------------------------------------------------------------------------------------------
# large corpora: streamed documents, parallel GPT-2 tokenisation, sharded output

class ShardWriter:
    """Appends EOT-led documents to fixed-size uint16 shards {split}_000.bin, ... with doc indexes.
    A document may continue across a shard boundary; its start is indexed in its first shard."""

    def __init__(self, out_dir, split, shard_size):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.buffer = np.empty(shard_size, dtype=TOKEN_DTYPE)  # pages touched only as filled
        self.fill, self.starts = 0, []
        self.names, self.tokens, self.docs = [], 0, 0

    def add(self, doc_tokens):
        self.starts.append(self.fill)
        self.docs += 1
        while len(doc_tokens):
            take = min(len(doc_tokens), self.shard_size - self.fill)
            self.buffer[self.fill: self.fill + take] = doc_tokens[:take]
            self.fill += take
            doc_tokens = doc_tokens[take:]
            if self.fill == self.shard_size:
                self.flush()

    def flush(self):
        if self.fill == 0:
            return
        name = f"{self.split}_{len(self.names):03d}.bin"
        path = os.path.join(self.out_dir, name)
        write_tokens(path, self.buffer[: self.fill])
        write_doc_index(doc_index_path(path), self.starts)
        self.names.append(name)
        self.tokens += self.fill
        self.fill, self.starts = 0, []


_worker = {}  # in each tokenizer process: the batch encoder and the document separator (BOS) of its tokenizer


def _init_worker(tokenizer, threads=False):
    _worker["encode"], _worker["bos"] = batch_encoder(tokenizer, threads), tokenizer_fields(tokenizer)["bos_token"]


def _tokenize_batch(texts):
    """Worker: the tokens of a batch of documents, each led by the BOS / EOT token, as one array + lengths."""
    token_lists = _worker["encode"](texts)
    stream, _ = documents_to_stream(token_lists, _worker["bos"])
    return stream, np.array([len(t) + 1 for t in token_lists], dtype=np.int64)


def _batched(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_stream(texts, num_proc, tokenizer="gpt2", batch_docs=256):
    """Yield (tokens, lengths) per batch of documents in input order, num_proc processes.
    Keeps a bounded number of batches in flight (Pool.imap would read the whole input ahead)."""
    batches = _batched(texts, batch_docs)
    if num_proc <= 1:
        _init_worker(tokenizer, threads=True)
        yield from map(_tokenize_batch, batches)
        return
    import multiprocessing
    with multiprocessing.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_tokenize_batch, (batch,)))
            if len(pending) >= 4 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def rows_texts(rows, text_field, where):
    """The text_field of each row, with errors (missing field, malformed file) naming where."""
    rows = iter(rows)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # datasets/pyarrow errors on malformed data
            raise ValueError(f"{where}: {first_line(e)}") from None
        if text_field not in row:
            raise ValueError(f"{where} has no {text_field!r} field (fields: {', '.join(row)}); see --text_field")
        yield row[text_field]


def iter_file_texts(path, text_field):
    """Documents of one local file: a whole .txt, or the text_field of each json/parquet row."""
    if path.endswith(".txt"):
        yield read_text_file(path)
        return
    from datasets import load_dataset
    builder = "parquet" if path.endswith(".parquet") else "json"
    rows = load_dataset(builder, data_files=path, split="train", streaming=True)
    yield from rows_texts(rows, text_field, path)


def hub_texts(name, subset, split, text_field, revision=None):
    """Documents of a Hugging Face hub dataset, streamed; opened now so a failure shows at once."""
    from datasets import load_dataset
    try:
        rows = load_dataset(name, subset, split=split, streaming=True, revision=revision)
    except Exception as e:
        what = f"{name} ({subset})" if subset else name
        raise ValueError(f"could not open {what} from the Hugging Face hub: {first_line(e)}") from None
    return rows_texts(rows, text_field, name)


def nonempty_texts(texts):
    for text in texts:
        if isinstance(text, str) and text:
            yield text


def prepare_sharded(texts, out_dir, val_fraction, shard_size, num_proc, source, max_tokens=None, progress=True,
                    tokenizer="gpt2"):
    """Tokenise a stream of documents into shards in out_dir (GPT-2 BPE, or a pretrained folder's tokenizer);
    returns meta."""
    from tqdm import tqdm
    check_val_fraction(val_fraction)
    fields = tokenizer_fields(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    # shards are written aside first: bad or unreadable input leaves an earlier dataset in out_dir whole
    staging = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
    try:
        writers = {split: ShardWriter(staging, split, shard_size) for split in ("train", "val")}
        doc_index, total = 0, 0
        with tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            for tokens, lengths in tokenize_stream(nonempty_texts(texts), num_proc, tokenizer):
                ends = np.cumsum(lengths)
                for start, end in zip(ends - lengths, ends):
                    writers["val" if is_val_doc(doc_index, val_fraction) else "train"].add(tokens[start:end])
                    doc_index += 1
                total += int(ends[-1])
                bar.update(int(ends[-1]))
                if max_tokens and total >= max_tokens:
                    break
        for writer in writers.values():
            writer.flush()
        if not writers["train"].tokens or not writers["val"].tokens:
            raise ValueError(f"only {doc_index} documents: too few for a val split of every "
                             f"{max(2, round(1 / val_fraction))}th document (raise --val_fraction or add data)")
        start_output(out_dir)  # the old meta.json goes first: an interruption from here on reads as unprepared
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remove_stale_shards(out_dir, writers["train"].names + writers["val"].names)
    write_tokenizer_file(out_dir, tokenizer)
    meta = dict(fields)
    for split, writer in writers.items():
        meta[f"{split}_tokens"], meta[f"{split}_docs"] = writer.tokens, writer.docs
    meta.update(val_fraction=val_fraction, val_split="documents", shard_size=shard_size,
                shards={split: writer.names for split, writer in writers.items()}, source=source)
    write_meta(out_dir, meta)
    return meta


def token_count(text):
    """argparse type for token counts: accepts 100000000, 1e8 or 100_000_000."""
    try:
        value = int(float(text.replace("_", "")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def sharded_parser(description, script_file, name=None, subset=None, inputs=None, val_fraction=0.001):
    """Arguments shared by data/{fineweb,openwebtext,english_mix}/prepare.py (they differ in defaults)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--name", default=name, help="Hugging Face dataset (used when --input is not given)")
    parser.add_argument("--subset", default=subset, help="dataset configuration, e.g. sample-10BT")
    parser.add_argument("--split", default="train", help="hub split to read")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--input", nargs="+", default=inputs,
                        help="local .txt/.jsonl/.jsonl.gz/.json/.parquet files or folders, read instead of the hub")
    parser.add_argument("--text_field", default="text", help="column holding each document's text")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(script_file)))
    parser.add_argument("--val_fraction", type=float, default=val_fraction,
                        help="every round(1/val_fraction)-th document goes to val")
    parser.add_argument("--shard_size", type=token_count, default=100_000_000, help="tokens per shard")
    parser.add_argument("--num_proc", type=int, default=max(1, os.cpu_count() or 1), help="tokenizer processes")
    parser.add_argument("--max_tokens", type=token_count, default=None, help="stop after about this many tokens")
    add_tokenizer_arg(parser)
    return parser


def sharded_main(args):
    t0 = time.time()
    try:
        if args.input:
            files = list_input_files(args.input)
            texts = (text for path in files for text in iter_file_texts(path, args.text_field))
            source = f"{', '.join(display_path(p) for p in args.input)} ({len(files)} files)"
        elif args.name:
            texts = hub_texts(args.name, args.subset, args.split, args.text_field, args.revision)
            source = f"{args.name} ({args.subset or 'default'}, split {args.split})"
        else:
            raise ValueError("give --input files or a hub dataset --name")
        meta = prepare_sharded(texts, args.out_dir, args.val_fraction, args.shard_size, args.num_proc,
                               source, max_tokens=args.max_tokens, tokenizer=resolve_tokenizer(args.tokenizer))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted (no meta.json written; rerun to prepare)")
    except Exception as e:  # anything else from datasets/pyarrow: one line, not a traceback
        raise SystemExit(f"error: {type(e).__name__}: {first_line(e)}")
    print_summary(args.out_dir, meta, time.time() - t0)


if __name__ == "__main__":
    sys.exit("prep.py is a library: run data/<name>/prepare.py")
