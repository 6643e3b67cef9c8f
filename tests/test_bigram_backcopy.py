"""Tests for the Bigram-Backcopy data source (bigram_backcopy.py)."""

import collections
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sinkgpt.bigram_backcopy import DEFAULT_CORPUS, BigramBackcopy, bayes_loss_per_position, build_table  # noqa: E402

CORPUS = None  # the bundled Shakespeare, data/shakespeare/corpus/*.txt


def make(split="train", batch_size=32, block_size=64, **kw):
    kw.setdefault("corpus", CORPUS)
    return BigramBackcopy(split, batch_size, block_size, **kw)


def sequences(loader, n_batches):
    """Full sequences (B, T+1) rebuilt from x and y, after checking that y is x shifted by one."""
    out = []
    for _ in range(n_batches):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (loader.batch_size, loader.block_size)
        assert torch.equal(x[:, 1:], y[:, :-1])
        out.append(torch.cat([x, y[:, -1:]], 1))
    return torch.cat(out).numpy()


def bayes_probs(loader, x):
    """The Bayes-optimal next-token distribution (B, T, V) for inputs x, straight from the table."""
    tab = loader.table
    x = x.numpy()
    p = tab.probs[x].copy()                      # bigram row of the current token
    p[:, 0] = tab.first_probs                    # position 0 is BOS: the trigger-free unigram
    rows, cols = np.nonzero(tab.is_trigger[x])   # after a trigger the token two back comes again
    p[rows, cols] = 0.0
    p[rows, cols, x[rows, cols - 1]] = 1.0
    return p


# -----------------------------------------------------------------------------
# the table

def test_table_shapes_meta_and_probabilities():
    loader = make()
    tab = loader.table
    V = loader.vocab_size
    assert V == len(tab.chars) + 1 and loader.bos_token == V - 1
    assert tab.chars == sorted(tab.chars) and len(set(tab.chars)) == len(tab.chars)
    assert loader.meta == {"tokenizer": "char", "chars": tab.chars, "bos_token": V - 1, "vocab_size": V,
                           "triggers": loader.triggers.tolist(), "dataset": "bigram_backcopy"}
    json.dumps(loader.meta)  # must be plain data
    assert tab.probs.shape == (V, V)
    np.testing.assert_allclose(tab.probs.sum(1), 1.0, atol=1e-12)
    assert np.all(tab.probs[:, loader.bos_token] == 0)        # nothing transitions into BOS
    np.testing.assert_allclose(tab.probs[loader.bos_token], tab.counts / tab.counts.sum())  # BOS row = unigram
    assert np.all(tab.first_probs[tab.is_trigger] == 0) and math.isclose(tab.first_probs.sum(), 1.0)
    assert build_table(CORPUS, 3) is tab  # cached: train and val loaders share the work


def test_bigram_table_matches_direct_count():
    # count pairs of one play with a plain Counter and compare to the vectorised table
    play = sorted(Path(DEFAULT_CORPUS).glob("*.txt"))[0]
    text = play.read_text(encoding="utf-8")
    tab = build_table(play, 3)
    pairs = collections.Counter(zip(text, text[1:]))
    ids = {c: i for i, c in enumerate(tab.chars)}
    a = ids["t"]
    row_total = sum(n for (c0, _), n in pairs.items() if c0 == "t")
    expected = np.zeros(len(tab.chars) + 1)
    for (c0, c1), n in pairs.items():
        if c0 == "t":
            expected[ids[c1]] = n / row_total
    np.testing.assert_allclose(tab.probs[a], expected, atol=1e-15)


def test_bundled_triggers_are_space_e_t():
    loader = make()
    counts = collections.Counter()
    for f in sorted(Path(DEFAULT_CORPUS).glob("*.txt")):
        counts.update(f.read_text(encoding="utf-8"))
    top3 = [c for c, _ in counts.most_common(3)]
    assert top3 == [" ", "e", "t"]
    assert loader.trigger_chars == top3
    assert [loader.meta["chars"][i] for i in loader.meta["triggers"]] == top3
    share = sum(counts[c] for c in top3) / sum(counts.values())
    assert 0.25 < share < 0.35  # the paper: about 30% of the character mass


# -----------------------------------------------------------------------------
# the sequences

def test_sequence_rules_hold_exactly():
    loader = make(batch_size=256, block_size=128)
    seq = sequences(loader, 2)
    tab = loader.table
    bos = loader.bos_token
    assert np.all(seq[:, 0] == bos)
    assert not np.any(seq[:, 1:] == bos)
    assert not np.any(tab.is_trigger[seq[:, 1]])                 # seq1 is never a trigger
    after_trigger = tab.is_trigger[seq[:, 1:-1]]                  # seq[t-1] trigger, t = 2..T
    copies = seq[:, 2:][after_trigger]
    assert after_trigger.sum() > 5000                             # the rule is exercised a lot
    np.testing.assert_array_equal(copies, seq[:, :-2][after_trigger])
    # a consequence of the rules: two triggers are never adjacent
    assert not np.any(tab.is_trigger[seq[:, 1:]] & tab.is_trigger[seq[:, :-1]])


def test_trigger_mask_marks_backcopy_targets():
    loader = make(batch_size=64)
    x, y = loader.next_batch()
    mask = loader.trigger_mask(x)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert not mask[:, 0].any()
    assert torch.equal(mask, torch.isin(x, loader.triggers))
    assert torch.equal(y[:, 1:][mask[:, 1:]], x[:, :-1][mask[:, 1:]])


def test_empirical_bigrams_match_table():
    loader = make(batch_size=512, block_size=256, seed=7)
    seq = sequences(loader, 2)
    tab = loader.table
    V = loader.vocab_size
    cur, nxt = seq[:, 1:-1].ravel(), seq[:, 2:].ravel()
    sampled = ~tab.is_trigger[cur]                                # non-trigger transitions are bigram draws
    counts = np.bincount(cur[sampled] * V + nxt[sampled], minlength=V * V).reshape(V, V)
    row_n = counts.sum(1)
    checked = 0
    for a in np.argsort(-row_n)[:10]:
        n = row_n[a]
        tv = 0.5 * np.abs(counts[a] / n - tab.probs[a]).sum()
        # the expected TV from sampling noise alone is about 0.5 * sum sqrt(2 p / (pi n))
        noise = 0.5 * np.sqrt(2 * tab.probs[a] / (np.pi * n)).sum()
        assert n > 5000 and tv < 2 * noise + 0.005, (tab.chars[a], n, tv, noise)
        checked += 1
    assert checked == 10
    # a wrong table would be caught: the row of the most frequent source vs another row
    a, b = np.argsort(-row_n)[:2]
    assert 0.5 * np.abs(counts[a] / row_n[a] - tab.probs[b]).sum() > 0.2
    # the first character follows the trigger-free unigram
    first = np.bincount(seq[:, 1], minlength=V) / len(seq)
    assert 0.5 * np.abs(first - tab.first_probs).sum() < 0.1


# -----------------------------------------------------------------------------
# streams: determinism, resume, separation

def test_same_seed_same_batches_and_seed_matters():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for _ in range(3):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        xc, _ = c.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)


def test_state_dict_resumes_bit_for_bit():
    loader = make(seed=11)
    for _ in range(2):
        loader.next_batch()
    state = loader.state_dict()
    # it must survive what train.py does with it: a torch checkpoint (weights_only) and JSON
    buf = io.BytesIO()
    torch.save({"loader": state}, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)["loader"]
    assert json.loads(json.dumps(state)) == state
    expected = [loader.next_batch() for _ in range(3)]
    resumed = make(seed=11)
    resumed.load_state_dict(restored)
    for x, y in expected:
        xr, yr = resumed.next_batch()
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_train_val_and_ranks_are_separate_streams():
    x_train, _ = make("train").next_batch()
    x_val, _ = make("val").next_batch()
    x_val_again, _ = make("val").next_batch()
    assert not torch.equal(x_train, x_val)
    assert torch.equal(x_val, x_val_again)  # a re-created val loader sees the same sequences


def test_ranks_split_the_global_batch_of_one_process():
    # DDP: rank r's rows are rows [r*B, (r+1)*B) of one process's batch of B * world_size
    single = make("train", batch_size=8)
    ranks = [make("train", batch_size=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, _ = single.next_batch()
        assert torch.equal(x, torch.cat([r.next_batch()[0] for r in ranks]))


# -----------------------------------------------------------------------------
# the Bayes-optimal loss

def exact_bayes_by_enumeration(tab, block_size):
    """Expected Bayes loss per position by walking every possible sequence (tiny vocabularies only)."""
    losses = np.zeros(block_size)
    H = lambda p: -sum(q * math.log(q) for q in p if q > 0)  # noqa: E731

    def walk(prev2, prev, t, prob):
        # predict seq[t] given ... prev2, prev = seq[t-2], seq[t-1]
        if t > block_size:
            return
        if tab.is_trigger[prev]:
            walk(prev, prev2, t + 1, prob)  # the copy is certain: loss 0
            return
        row = tab.probs[prev]
        losses[t - 1] += prob * H(row)
        for c in np.nonzero(row)[0]:
            walk(prev, c, t + 1, prob * row[c])

    losses[0] = H(tab.first_probs)
    for c in np.nonzero(tab.first_probs)[0]:
        walk(len(tab.chars), c, 2, tab.first_probs[c])
    return losses


def test_bayes_loss_recursion_is_exact_on_tiny_corpus(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abba cab. aab bcab acca ba\n", encoding="utf-8")
    tab = build_table(path, 2)
    T = 7
    np.testing.assert_allclose(bayes_loss_per_position(tab, T), exact_bayes_by_enumeration(tab, T), atol=1e-12)


def test_bayes_loss_matches_monte_carlo():
    loader = make(batch_size=500, block_size=64, seed=5)
    tab = loader.table
    seq = sequences(loader, 8)  # 4000 windows
    x, y = seq[:, :-1], seq[:, 1:]
    with np.errstate(divide="ignore"):  # copies after a trigger may have bigram prob 0; zeroed below
        nll = -np.log(tab.probs[x, y])
    nll[:, 0] = -np.log(tab.first_probs[y[:, 0]])
    nll[tab.is_trigger[x]] = 0.0  # the back-copy is certain
    per_window = nll.mean(1)
    mc, se = per_window.mean(), per_window.std() / math.sqrt(len(per_window))
    assert se < 0.005
    assert abs(mc - loader.bayes_loss) < 4 * se, (mc, loader.bayes_loss, se)
    # position by position, too (this is where the early, BOS-dependent positions show)
    per_pos = loader.bayes_loss_per_position
    assert per_pos.shape == (64,) and math.isclose(per_pos.mean(), loader.bayes_loss)
    pos_se = nll.std(0) / math.sqrt(len(nll))
    assert np.all(np.abs(nll.mean(0) - per_pos) < 5 * pos_se + 1e-9)
    assert 1.0 < loader.bayes_loss < math.log(loader.vocab_size)


# -----------------------------------------------------------------------------
# eval_metrics

def test_eval_metrics_on_perfect_and_uniform_logits():
    loader = make(batch_size=1000, block_size=64, seed=9)
    x, y = loader.next_batch()
    p = bayes_probs(loader, x)
    eps = 1e-6  # the back-copy as a near-one-hot: a little mass on every token
    logits = torch.from_numpy(np.log((1 - eps) * p + eps / loader.vocab_size)).float()
    m = loader.eval_metrics(logits, x, y)
    assert set(m) == {"backcopy_loss", "bigram_loss"}
    assert 0 <= m["backcopy_loss"] < 1e-5
    mask = loader.trigger_mask(x)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").double()
    assert m["backcopy_loss"] == pytest.approx(ce[mask].mean().item(), abs=1e-6)
    assert m["bigram_loss"] == pytest.approx(ce[~mask].mean().item(), abs=1e-6)
    n_copy = mask.sum().item()
    overall = (m["backcopy_loss"] * n_copy + m["bigram_loss"] * (x.numel() - n_copy)) / x.numel()
    per_window = ce.mean(1)
    se = (per_window.std() / math.sqrt(len(per_window))).item()
    assert abs(overall - loader.bayes_loss) < 4 * se, (overall, loader.bayes_loss, se)
    # padded vocabulary columns (nanoGPT rounds vocab_size up) change nothing if they are -inf
    padded = torch.cat([logits, torch.full((*logits.shape[:2], 11), -1e9)], -1)
    assert loader.eval_metrics(padded, x, y) == pytest.approx(m, abs=1e-6)
    # uniform logits: both losses are log V
    flat = loader.eval_metrics(torch.zeros(*x.shape, loader.vocab_size), x, y)
    assert flat == pytest.approx({"backcopy_loss": math.log(loader.vocab_size),
                                  "bigram_loss": math.log(loader.vocab_size)})
    with pytest.raises(ValueError):
        loader.eval_metrics(logits[:, :-1], x, y)


# -----------------------------------------------------------------------------
# custom corpora and errors

def test_tiny_custom_corpus_file_and_folder(tmp_path):
    text = "the cat sat on the mat. a tan hat!\n"
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    (tmp_path / "two.txt").write_text("that rat ate the oat\n", encoding="utf-8")
    loader = BigramBackcopy("train", 16, 32, n_triggers=2, corpus=tmp_path / "one.txt")
    assert loader.meta["chars"] == sorted(set(text))
    assert loader.vocab_size == len(set(text)) + 1
    counts = collections.Counter(text)
    assert loader.trigger_chars == [" ", "t"] and counts[" "] >= counts["t"] >= max(
        n for c, n in counts.items() if c not in " t")
    seq = sequences(loader, 4)
    tab = loader.table
    after_trigger = tab.is_trigger[seq[:, 1:-1]]
    np.testing.assert_array_equal(seq[:, 2:][after_trigger], seq[:, :-2][after_trigger])
    assert not np.any(tab.is_trigger[seq[:, 1]]) and not np.any(seq[:, 1:] == loader.bos_token)
    # '\n' ends the file and has no successor: its row falls back to the unigram and still sums to 1
    np.testing.assert_allclose(tab.probs.sum(1), 1.0)
    # a folder reads every .txt inside; characters from both files
    both = BigramBackcopy("val", 4, 16, n_triggers=1, corpus=str(tmp_path))
    assert set(both.meta["chars"]) == set(text) | set("that rat ate the oat\n")
    # pairs never straddle two files: "\n" is the last char of both files, so it has no successor
    assert both.table.probs[both.meta["chars"].index("\n")].tolist() == pytest.approx(
        (both.table.counts / both.table.counts.sum()).tolist())


def test_clear_errors(tmp_path):
    (tmp_path / "abc.txt").write_text("aabbc", encoding="utf-8")
    with pytest.raises(ValueError, match="n_triggers"):
        BigramBackcopy("train", 2, 8, n_triggers=0, corpus=tmp_path / "abc.txt")
    with pytest.raises(ValueError, match="n_triggers"):
        BigramBackcopy("train", 2, 8, n_triggers=3, corpus=tmp_path / "abc.txt")
    with pytest.raises(ValueError, match="not found"):
        BigramBackcopy("train", 2, 8, corpus=tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        BigramBackcopy("train", 2, 8, corpus=tmp_path / "empty")
    with pytest.raises(ValueError, match="rank"):
        BigramBackcopy("train", 2, 8, corpus=tmp_path / "abc.txt", rank=2, world_size=2)
    assert BigramBackcopy("train", 2, 8, n_triggers=2, corpus=tmp_path / "abc.txt").vocab_size == 4
