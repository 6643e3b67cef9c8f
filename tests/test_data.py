"""Prepare scripts (char, BPE, sharded), the prepared format, and the TokenLoader."""
import filecmp
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from sinkgpt import loader  # noqa: E402
from sinkgpt import prep  # noqa: E402
from sinkgpt import tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # the bundled GPT-2 ranks: no network wait, same tokens
    monkeypatch.setenv("SINKGPT_OFFLINE", "1")


def make_doc(i, n_lines=6):
    return "".join(f"Doc {i} line {j}: the café of ACT {i * j}.\n" for j in range(n_lines))


def write_corpus(folder, n_docs, n_lines=6):
    os.makedirs(folder, exist_ok=True)
    docs = [make_doc(i, n_lines) for i in range(n_docs)]
    for i, doc in enumerate(docs):
        with open(os.path.join(folder, f"doc_{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(doc)
    return docs  # file names sort like the list


def read_split(out_dir, split):
    meta = prep.read_meta(out_dir)
    streams, starts = [], []
    for name in meta["shards"][split]:
        path = os.path.join(out_dir, name)
        streams.append(np.fromfile(path, dtype=np.uint16))
        starts.append(np.load(prep.doc_index_path(path)))
    return meta, streams, starts


def split_at_bos(stream, bos):
    """Documents of a stream [EOT d1 EOT d2 ...] (the stream must start with EOT)."""
    assert stream[0] == bos
    cuts = np.flatnonzero(stream == bos)
    return [stream[a + 1: b] for a, b in zip(cuts, list(cuts[1:]) + [len(stream)])]


def same_files(dir_a, dir_b):
    names = sorted(os.listdir(dir_a))
    assert names == sorted(os.listdir(dir_b))
    return all(filecmp.cmp(os.path.join(dir_a, n), os.path.join(dir_b, n), shallow=False) for n in names)


# ---------------------------------------------------------------------------------------------
# bundled files

def test_bundled_corpus_and_tokenizer_files():
    corpus = os.path.join(REPO, "data", "shakespeare", "corpus")
    assert len([n for n in os.listdir(corpus) if n.endswith(".txt")]) == 42
    assert os.path.exists(os.path.join(corpus, "SOURCE.md"))
    for name in ("gpt2.tiktoken", "LICENSE", "SOURCE.md"):
        assert os.path.exists(os.path.join(REPO, "data", "gpt2_tokenizer", name))


# ---------------------------------------------------------------------------------------------
# char and BPE prepare of small corpora

def test_char_prepare_whole_document_split(tmp_path):
    docs = write_corpus(tmp_path / "corpus", 12)
    meta = prep.prepare_text_dataset([str(tmp_path / "corpus")], str(tmp_path / "out"), "char", 0.1)
    chars = sorted(set("".join(docs)))
    assert meta["tokenizer"] == "char" and meta["chars"] == chars
    assert meta["bos_token"] == len(chars) and meta["vocab_size"] == len(chars) + 1
    assert meta["val_split"] == "documents" and meta["train_docs"] == 11 and meta["val_docs"] == 1
    on_disk = json.load(open(tmp_path / "out" / "meta.json"))
    assert on_disk == meta

    tok = tokenizer.load_tokenizer(meta)
    _, (train,), (train_starts,) = read_split(str(tmp_path / "out"), "train")
    _, (val,), (val_starts,) = read_split(str(tmp_path / "out"), "val")
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    # every document preceded by EOT, the index lists exactly those positions
    assert np.array_equal(train_starts, np.flatnonzero(train == meta["bos_token"]))
    assert np.array_equal(val_starts, np.flatnonzero(val == meta["bos_token"]))
    # every 10th document (index 9) held out whole, in sorted input order
    assert [tok.decode(d.tolist()) for d in split_at_bos(train, meta["bos_token"])] == docs[:9] + docs[10:]
    assert [tok.decode(d.tolist()) for d in split_at_bos(val, meta["bos_token"])] == [docs[9]]
    assert tok.decode(tok.encode(docs[3])) == docs[3]


def test_char_prepare_span_split_for_few_documents(tmp_path):
    docs = write_corpus(tmp_path / "corpus", 3, n_lines=20)
    meta = prep.prepare_text_dataset([str(tmp_path / "corpus")], str(tmp_path / "out"), "char", 0.1)
    assert meta["val_split"] == "spans" and meta["train_docs"] == 3 and meta["val_docs"] == 3
    tok = tokenizer.load_tokenizer(meta)
    _, (train,), _ = read_split(str(tmp_path / "out"), "train")
    _, (val,), _ = read_split(str(tmp_path / "out"), "val")
    heads = [tok.decode(d.tolist()) for d in split_at_bos(train, meta["bos_token"])]
    tails = [tok.decode(d.tolist()) for d in split_at_bos(val, meta["bos_token"])]
    for doc, head, tail in zip(docs, heads, tails):
        assert head + tail == doc
        assert head.endswith("\n")  # cut at a line start
        assert 0.05 < len(tail) / len(doc) < 0.2


def test_char_prepare_tail_split_is_nanogpts(tmp_path):
    # val = the last 10% of the concatenated corpus in file order (a fixed span), as nanoGPT's prepare.py
    docs = write_corpus(tmp_path / "corpus", 12)
    meta = prep.prepare_text_dataset([str(tmp_path / "corpus")], str(tmp_path / "out"), "char", 0.1,
                                     val_split="tail")
    bos = meta["bos_token"]
    tok = tokenizer.load_tokenizer(meta)
    _, (train,), (train_starts,) = read_split(str(tmp_path / "out"), "train")
    _, (val,), (val_starts,) = read_split(str(tmp_path / "out"), "val")
    whole = np.concatenate([train, val])
    assert len(train) == int(len(whole) * 0.9) and meta["val_split"] == "tail"
    assert [tok.decode(d.tolist()) for d in split_at_bos(whole, bos)] == docs  # nothing lost or reordered
    assert np.array_equal(train_starts, np.flatnonzero(train == bos))
    # the val span starts inside a document: position 0 counts as a start, then every EOT
    assert val[0] != bos and np.array_equal(val_starts, np.union1d([0], np.flatnonzero(val == bos)))
    assert meta["val_docs"] == len(val_starts) and meta["train_docs"] == len(train_starts)
    with pytest.raises(ValueError, match="val_split"):
        prep.prepare_text_dataset([str(tmp_path / "corpus")], str(tmp_path / "bad"), "char", 0.1, val_split="random")


def test_prepare_is_deterministic(tmp_path):
    write_corpus(tmp_path / "corpus", 15)
    for out in ("a", "b"):
        prep.prepare_text_dataset([str(tmp_path / "corpus")], str(tmp_path / out), "char", 0.1)
    assert same_files(tmp_path / "a", tmp_path / "b")


def test_rerun_leaves_no_temp_or_stale_files(tmp_path):
    write_corpus(tmp_path / "corpus", 12)
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "train_007.bin").write_bytes(b"\0\0")  # left by an earlier sharded prepare
    prep.prepare_text_dataset([str(tmp_path / "corpus")], str(out), "char", 0.1)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "train.docs.npy", "val.bin", "val.docs.npy"]


def test_bpe_prepare(tmp_path):
    docs = write_corpus(tmp_path / "corpus", 10)
    meta = prep.prepare_text_dataset([str(tmp_path / "corpus")], str(tmp_path / "out"), "gpt2", 0.2)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["bos_token"] == 50256
    assert "chars" not in meta and meta["val_docs"] == 2  # documents 4 and 9
    enc = tokenizer.gpt2_encoding()
    _, (train,), (starts,) = read_split(str(tmp_path / "out"), "train")
    _, (val,), _ = read_split(str(tmp_path / "out"), "val")
    assert np.array_equal(starts, np.flatnonzero(train == 50256))
    train_docs = [d for i, d in enumerate(docs) if i % 5 != 4]
    assert [enc.decode(d.tolist()) for d in split_at_bos(train, 50256)] == train_docs
    assert [enc.decode(d.tolist()) for d in split_at_bos(val, 50256)] == [docs[4], docs[9]]
    assert train[1:1 + 5].tolist() == enc.encode_ordinary(docs[0])[:5]


def test_prepare_script_from_another_cwd(tmp_path):
    write_corpus(tmp_path / "corpus", 12)
    script = os.path.join(REPO, "data", "shakespeare_char", "prepare.py")
    run = subprocess.run([sys.executable, script, "--input", "corpus", "--out_dir", "out"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "vocab_size" in run.stdout and "train:" in run.stdout
    assert prep.read_meta(str(tmp_path / "out"))["train_docs"] == 11


def test_prepare_script_bad_input_is_one_error_line(tmp_path):
    script = os.path.join(REPO, "data", "shakespeare", "prepare.py")
    run = subprocess.run([sys.executable, script, "--input", str(tmp_path / "nope"), "--out_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [f"error: input not found: {tmp_path / 'nope'}"]


def test_val_fraction_checked(tmp_path):
    write_corpus(tmp_path / "corpus", 12)
    with pytest.raises(ValueError, match="val_fraction"):
        prep.prepare_text_dataset([str(tmp_path / "corpus")], str(tmp_path / "out"), "char", 1.5)


# ---------------------------------------------------------------------------------------------
# sharded prepare (fineweb / openwebtext / english_mix) from local jsonl.gz and parquet

def write_jsonl_gz(path, texts):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "source": "test"}) + "\n")


def write_parquet(path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)


@pytest.fixture
def web_corpus(tmp_path):
    folder = tmp_path / "web"
    os.makedirs(folder)
    texts_a = [make_doc(i, 3) for i in range(25)]
    texts_b = [make_doc(100 + i, 2) for i in range(15)]
    write_jsonl_gz(folder / "a.jsonl.gz", texts_a)
    write_parquet(folder / "b.parquet", texts_b)
    return folder, texts_a + texts_b  # a.jsonl.gz sorts before b.parquet


def run_sharded(script_name, argv):
    parser = prep.sharded_parser("test", os.path.join(REPO, "data", script_name, "prepare.py"))
    prep.sharded_main(parser.parse_args(argv))


def test_sharded_prepare_local_files(tmp_path, web_corpus):
    folder, texts = web_corpus
    out = tmp_path / "out"
    run_sharded("fineweb", ["--input", str(folder), "--out_dir", str(out), "--val_fraction", "0.1",
                            "--shard_size", "300", "--num_proc", "1"])
    enc = tokenizer.gpt2_encoding()
    meta, train_shards, train_starts = read_split(str(out), "train")
    _, val_shards, val_starts = read_split(str(out), "val")
    assert meta["train_docs"] == 36 and meta["val_docs"] == 4 and meta["shard_size"] == 300
    assert meta["shards"]["train"] == [f"train_{i:03d}.bin" for i in range(len(train_shards))]
    assert len(train_shards) > 2
    assert all(len(s) == 300 for s in train_shards[:-1]) and 0 < len(train_shards[-1]) <= 300
    for shards, starts in ((train_shards, train_starts), (val_shards, val_starts)):
        for stream, index in zip(shards, starts):
            assert np.array_equal(index, np.flatnonzero(stream == 50256))  # every entry is an EOT
    train = np.concatenate(train_shards)
    assert len(train) == meta["train_tokens"]
    assert sum(len(i) for i in train_starts) == meta["train_docs"]
    expected_train = [t for i, t in enumerate(texts) if i % 10 != 9]
    assert [enc.decode(d.tolist()) for d in split_at_bos(train, 50256)] == expected_train
    val = np.concatenate(val_shards)
    assert [enc.decode(d.tolist()) for d in split_at_bos(val, 50256)] == texts[9::10]


def test_sharded_prepare_parallel_is_identical(tmp_path, web_corpus):
    folder, _ = web_corpus
    for out, procs in (("one", "1"), ("two", "2")):
        run_sharded("openwebtext", ["--input", str(folder), "--out_dir", str(tmp_path / out),
                                    "--val_fraction", "0.1", "--shard_size", "1000", "--num_proc", procs])
    assert same_files(tmp_path / "one", tmp_path / "two")


def test_sharded_prepare_errors(tmp_path):
    folder = tmp_path / "bad"
    os.makedirs(folder)
    with gzip.open(folder / "x.jsonl.gz", "wt") as f:
        for i in range(12):
            f.write(json.dumps({"content": f"doc {i}"}) + "\n")
    with pytest.raises(SystemExit, match="error: .*'text' field.*--text_field"):
        run_sharded("fineweb", ["--input", str(folder), "--out_dir", str(tmp_path / "o"), "--num_proc", "1"])
    run_sharded("fineweb", ["--input", str(folder), "--out_dir", str(tmp_path / "o"), "--num_proc", "1",
                            "--text_field", "content", "--val_fraction", "0.1"])
    assert prep.read_meta(str(tmp_path / "o"))["train_docs"] == 11
    with pytest.raises(SystemExit, match="error: only 3 documents"):
        write_jsonl_gz(folder / "x.jsonl.gz", ["a", "b", "c"])
        run_sharded("fineweb", ["--input", str(folder), "--out_dir", str(tmp_path / "p"), "--num_proc", "1"])
    assert not os.path.exists(tmp_path / "p" / "meta.json")


def test_sharded_prepare_bad_input_leaves_the_earlier_dataset_whole(tmp_path, web_corpus):
    folder, _ = web_corpus
    out = tmp_path / "out"
    args = ["--out_dir", str(out), "--val_fraction", "0.1", "--shard_size", "300", "--num_proc", "1"]
    run_sharded("openwebtext", ["--input", str(folder), *args])
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    few = tmp_path / "few"
    os.makedirs(few)
    write_jsonl_gz(few / "x.jsonl.gz", ["only one document"])  # too few for a val split: refused after reading
    with pytest.raises(SystemExit, match="error: only 1 documents"):
        run_sharded("openwebtext", ["--input", str(few), *args])
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # no staging folder left
    assert prep.read_meta(str(out))["train_docs"] == 36


def run_script(script_name, argv, monkeypatch):
    """Run data/<script_name>/prepare.py as __main__ in this process (torch/datasets already loaded)."""
    import runpy
    script = os.path.join(REPO, "data", script_name, "prepare.py")
    monkeypatch.setattr(sys, "argv", [script] + argv)
    runpy.run_path(script, run_name="__main__")


@pytest.mark.parametrize("script_name", ["fineweb", "openwebtext"])
def test_web_scripts_on_local_files(tmp_path, web_corpus, monkeypatch, capsys, script_name):
    folder, _ = web_corpus
    run_script(script_name, ["--input", str(folder), "--out_dir", str(tmp_path / "o"), "--val_fraction", "0.1",
                             "--num_proc", "2"], monkeypatch)
    assert "train_000.bin" in capsys.readouterr().out
    meta = prep.read_meta(str(tmp_path / "o"))
    assert meta["shards"] == {"train": ["train_000.bin"], "val": ["val_000.bin"]}
    assert meta["train_docs"] + meta["val_docs"] == 40 and meta["shard_size"] == 100_000_000


def test_english_mix_script_with_shakespeare(tmp_path, web_corpus, monkeypatch):
    folder, _ = web_corpus
    run_script("english_mix", ["--input", str(folder), "--out_dir", str(tmp_path / "o"), "--num_proc", "2"],
               monkeypatch)
    meta = prep.read_meta(str(tmp_path / "o"))
    assert meta["train_docs"] + meta["val_docs"] == 40 + 42 and meta["val_fraction"] == 0.1
    assert meta["train_tokens"] > 1_000_000
    with pytest.raises(SystemExit, match="error: input not found"):
        run_script("english_mix", ["--input", str(tmp_path / "nothing"), "--no-with_shakespeare",
                                   "--out_dir", str(tmp_path / "p")], monkeypatch)



# english_mix rebuilt from its Debian packages (build.py), on a small stand-in of the unpacked packages


def english_mix_builder():
    import runpy
    return runpy.run_path(os.path.join(REPO, "data", "english_mix", "build.py"))


def fake_package_root(root):
    """The files build.py reads, as the three packages unpack them: a dictd dictionary of five entries (one entry
    listed under two headwords), two Python doc sources (one empty) and one POD file."""
    builder = english_mix_builder()
    digits = builder["DICTD_DIGITS"]

    def number(n):
        return digits[n] if n < 64 else digits[n // 64] + digits[n % 64]

    entries = ["alpha\n  the first letter\n", "beta\n  the second\n", "gamma\n  the third letter, at length\n",
               "delta\n  fourth\n", "epsilon\n  fifth\n"]
    data, index, offset = b"", [], 0
    for headword, entry in zip(["alpha", "beta", "gamma", "delta", "epsilon"], entries):
        raw = entry.encode()
        index.append(f"{headword}\t{number(offset)}\t{number(len(raw))}")
        data, offset = data + raw, offset + len(raw)
    index.append(f"b\t{number(len(entries[0].encode()))}\t{number(len(entries[1].encode()))}")  # beta again
    dictd = root / "usr" / "share" / "dictd"
    dictd.mkdir(parents=True)
    (dictd / "gcide.index").write_text("\n".join(sorted(index)) + "\n")
    with gzip.open(dictd / "gcide.dict.dz", "wb") as f:
        f.write(data)
    sources = root / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    (sources / "library").mkdir(parents=True)
    (sources / "about.rst.txt").write_text("About\n=====\n\nThese documents.\n")
    (sources / "library" / "os.rst.txt").write_text("\n\n")
    pod = root / "usr" / "share" / "perl" / "5.36.0" / "pod"
    pod.mkdir(parents=True)
    (pod / "perl.pod").write_text("=head1 NAME\n\nperl\n")
    return entries


def read_documents(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_english_mix_builds_from_the_unpacked_packages(tmp_path, capsys):
    builder = english_mix_builder()
    assert builder["dictd_number"]("B") == 1 and builder["dictd_number"]("BA") == 64
    entries = fake_package_root(tmp_path / "root")
    builder["build"](str(tmp_path / "root"), str(tmp_path / "out"))
    gcide = read_documents(tmp_path / "out" / "gcide.jsonl.gz")
    assert [d["source"] for d in gcide] == ["gcide"] * len(gcide)
    texts = [e.rstrip("\n") for e in entries]  # dictionary order, each once, grouped to >= 4000 characters
    assert [d["text"] for d in gcide] == ["\n\n".join(texts)]
    short = builder["dictionary_documents"](str(tmp_path / "root/usr/share/dictd/gcide.index"),
                                             str(tmp_path / "root/usr/share/dictd/gcide.dict.dz"), least=30)
    assert short == ["\n\n".join(texts[:2]), "\n\n".join(texts[2:3]), "\n\n".join(texts[3:])]
    python_docs = read_documents(tmp_path / "out" / "python_docs.jsonl.gz")
    assert [d["text"] for d in python_docs] == ["About\n=====\n\nThese documents."]  # the empty file left out
    assert [d["text"] for d in read_documents(tmp_path / "out" / "perl_docs.jsonl.gz")] == ["=head1 NAME\n\nperl"]
    assert "python_docs.jsonl.gz: 1 documents" in capsys.readouterr().out


def test_english_mix_build_without_the_packages_is_one_error_line(tmp_path, capsys):
    assert english_mix_builder()["main"](["--out_dir", str(tmp_path / "out"), "--debs", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no dict-gcide_*.deb in")

@pytest.mark.slow
def test_fineweb_script_subprocess(tmp_path, web_corpus):
    # a fresh interpreter: datasets imports torch, several seconds on a small machine
    folder, _ = web_corpus
    script = os.path.join(REPO, "data", "fineweb", "prepare.py")
    run = subprocess.run([sys.executable, script, "--input", str(folder), "--out_dir", str(tmp_path / "o"),
                          "--val_fraction", "0.1", "--num_proc", "2"],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "SINKGPT_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert prep.read_meta(str(tmp_path / "o"))["train_docs"] == 36


# ---------------------------------------------------------------------------------------------
# loader

def write_arange_dataset(folder, lengths=(3000, 4000), bos=0):
    """Shards holding consecutive ids (shard k starts at 10000*k): windows are easy to check."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for k, n in enumerate(lengths):
        name = f"train_{k:03d}.bin"
        prep.write_tokens(os.path.join(folder, name), np.arange(n) + 10000 * k + 1)
        names.append(name)
    prep.write_meta(folder, {"vocab_size": 20000, "bos_token": bos, "tokenizer": "char", "chars": [],
                             "shards": {"train": names, "val": names}})
    return str(folder)


@pytest.fixture
def char_data(tmp_path):
    write_corpus(tmp_path / "corpus", 20, n_lines=8)
    prep.prepare_text_dataset([str(tmp_path / "corpus")], str(tmp_path / "char"), "char", 0.1)
    return str(tmp_path / "char")


def test_loader_shapes_and_shift(tmp_path):
    data = write_arange_dataset(tmp_path / "ar")
    L = loader.TokenLoader(data, "train", batch_size=8, block_size=32)
    assert L.vocab_size == 20000 and L.bos_token == 0 and L.meta["tokenizer"] == "char"
    seen_shards = set()
    for _ in range(20):
        x, y = L.next_batch()
        assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one (consecutive ids)
        assert torch.all(x[:, -1] - x[:, 0] == 31)  # contiguous windows
        seen_shards |= set((x[:, 0] // 10000).tolist())
    assert seen_shards == {0, 1}


def test_loader_shard_weighting(tmp_path):
    data = write_arange_dataset(tmp_path / "ar", lengths=(1000, 9000))
    L = loader.TokenLoader(data, "train", batch_size=500, block_size=8)
    share = (L.next_batch()[0][:, 0] >= 10000).float().mean().item()
    assert 0.84 < share < 0.96


def test_loader_prepend_bos(tmp_path):
    data = write_arange_dataset(tmp_path / "ar", bos=0)
    L = loader.TokenLoader(data, "train", batch_size=16, block_size=10, prepend_bos=True)
    x, y = L.next_batch()
    assert torch.all(x[:, 0] == 0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, 1:], y[:, :-1] + 1)


@pytest.mark.parametrize("with_index", [True, False])
def test_loader_align_to_docs(char_data, with_index):
    if not with_index:
        for name in ("train.docs.npy", "val.docs.npy"):
            os.remove(os.path.join(char_data, name))
    for prepend in (False, True):
        L = loader.TokenLoader(char_data, "train", batch_size=32, block_size=64, align_to_docs=True,
                               prepend_bos=prepend)
        x, y = L.next_batch()
        assert torch.all(x[:, 0] == L.bos_token)
        assert torch.equal(x[:, 1:], y[:, :-1])
        tok = tokenizer.load_tokenizer(L.meta)
        assert all(tok.decode(row[1:20].tolist()).startswith("Doc ") for row in x)


def test_loader_resume_is_exact(char_data, tmp_path):
    L = loader.TokenLoader(char_data, "train", batch_size=4, block_size=16, seed=7)
    for _ in range(3):
        L.next_batch()
    torch.save({"loader": L.state_dict()}, tmp_path / "ckpt.pt")
    expected = [L.next_batch() for _ in range(5)]
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"]
    resumed = loader.TokenLoader(char_data, "train", batch_size=4, block_size=16, seed=7)
    resumed.next_batch()  # a different position before loading: the state must override it
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(5))):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_loader_same_seed_same_batches_ranks_and_splits_differ(char_data):
    def first(split="train", **kw):
        return loader.TokenLoader(char_data, split, batch_size=8, block_size=16, **kw).next_batch()[0]
    assert torch.equal(first(), first())
    assert not torch.equal(first(rank=0, world_size=2), first(rank=1, world_size=2))
    assert not torch.equal(first(seed=1), first(seed=2))
    assert not torch.equal(first("train"), first("val"))


def test_loader_ranks_split_the_global_batch_of_one_process(char_data):
    # DDP: the ranks' rows together are exactly one process's batch of batch_size * world_size, batch after
    # batch, and a rank resumed from rank 0's saved state continues its own rows exactly
    for align in (False, True):
        single = loader.TokenLoader(char_data, "train", 8, 16, align_to_docs=align)
        ranks = [loader.TokenLoader(char_data, "train", 4, 16, rank=r, world_size=2, align_to_docs=align)
                 for r in range(2)]
        for _ in range(3):
            x, y = single.next_batch()
            parts = [r.next_batch() for r in ranks]
            assert torch.equal(x, torch.cat([p[0] for p in parts]))
            assert torch.equal(y, torch.cat([p[1] for p in parts]))
        state = ranks[0].state_dict()
        resumed = loader.TokenLoader(char_data, "train", 4, 16, rank=1, world_size=2, align_to_docs=align)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.next_batch()[0], ranks[1].next_batch()[0])


def test_loader_missing_data_errors(tmp_path, char_data):
    with pytest.raises(FileNotFoundError, match=r"meta.json missing\): run python data/shakespeare_char/prepare.py"):
        loader.TokenLoader(str(tmp_path / "shakespeare_char"), "train", 4, 8)
    with pytest.raises(FileNotFoundError, match="prepare"):
        loader.open_dataset("no_such_dataset", data_root=str(tmp_path))
    with pytest.raises(ValueError, match="lower block_size"):
        loader.TokenLoader(char_data, "val", 4, 10**6)
    os.remove(os.path.join(char_data, "val.bin"))
    with pytest.raises(FileNotFoundError, match="val.bin missing"):
        loader.TokenLoader(char_data, "val", 4, 8)


def test_open_dataset_prepares_bundled_char(tmp_path, capsys):
    data_dir = loader.open_dataset("shakespeare_char", data_root=str(tmp_path))
    assert data_dir == os.path.join(str(tmp_path), "shakespeare_char")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "prepared" in out
    meta = prep.read_meta(data_dir)
    assert meta["train_docs"] == 38 and meta["val_docs"] == 4 and meta["vocab_size"] == len(meta["chars"]) + 1
    assert loader.open_dataset(data_dir) == data_dir  # a prepared folder is used as is
    x, y = loader.TokenLoader(data_dir, "val", 2, 8).next_batch()
    assert x.shape == (2, 8)


def test_open_dataset_prepares_the_nanogpt_split_of_the_bundled_corpus(tmp_path, capsys):
    data_dir = loader.open_dataset("shakespeare_char_tail", data_root=str(tmp_path))
    meta = prep.read_meta(data_dir)
    assert meta["val_split"] == "tail" and meta["vocab_size"] == 85
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["train_tokens"] == int(total * 0.9)
    train = np.fromfile(os.path.join(data_dir, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(data_dir, "val.bin"), dtype=np.uint16)
    tok = tokenizer.load_tokenizer(meta)
    # the held-out tail ends with the last work in file order (The Winter's Tale)
    corpus = os.path.join(REPO, "data", "shakespeare", "corpus")
    last = sorted(n for n in os.listdir(corpus) if n.endswith(".txt"))[-1]
    with open(os.path.join(corpus, last), encoding="utf-8") as f:
        assert tok.decode(val[-200:].tolist()) == f.read()[-200:]
    assert train[0] == meta["bos_token"]


