"""
Bigram-Backcopy (BB): a synthetic task on which attention sinks and massive
activations appear within a few hundred steps (Guo et al. 2024, arXiv 2410.13835).

A sequence is BOS, then a character drawn from the corpus unigram without the
triggers, then characters drawn from the corpus bigram table P(b | a), except
that right after a trigger character the token two back is copied:
    seq[t] = seq[t-2]  if seq[t-1] is a trigger   (deterministic back-copy)
    seq[t] ~ P(. | seq[t-1])  otherwise
Trigger positions need attention to the previous token; all others only need the
current token, so heads learn to park their attention somewhere harmless (BOS).

The data is generated on the fly from a seeded numpy PCG64 stream, so a loader is
resumable bit for bit through state_dict() / load_state_dict(), and train / val
(and each rank) draw from separate streams.

May import: sinkgpt.common.
"""

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sinkgpt.common import REPO_ROOT

DEFAULT_CORPUS = Path(REPO_ROOT) / "data" / "shakespeare" / "corpus"


# -----------------------------------------------------------------------------
# the bigram table, measured once per (corpus, n_triggers)

@dataclass(frozen=True)
class BigramTable:
    chars: list              # sorted corpus characters; id i <-> chars[i], BOS = len(chars)
    counts: np.ndarray       # (V,) int64 character counts (BOS: 0)
    probs: np.ndarray        # (V, V) float64 P(next | current); BOS row = unigram, BOS column = 0
    first_probs: np.ndarray  # (V,) distribution of seq[1]: unigram with triggers removed
    cdf_flat: np.ndarray     # (V*V,) int64 sampling thresholds: row a's cumulative probs * 2^32, offset by a * 2^32
    first_cdf: np.ndarray    # (V,) int64 cumulative first_probs * 2^32
    triggers: np.ndarray     # (n_triggers,) int64 ids, most frequent first
    is_trigger: np.ndarray   # (V,) bool


_TABLE_CACHE = {}


def _corpus_files(corpus):
    """Resolve `corpus` (a .txt file or a folder of .txt files) to a sorted list of files."""
    path = Path(DEFAULT_CORPUS if corpus is None else corpus).expanduser().resolve()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"bigram_backcopy: corpus folder {path} holds no .txt files")
        return files
    raise ValueError(f"bigram_backcopy: corpus not found: {path} (expected a text file or a folder of .txt files)")


_ONE = 1 << 32  # sampling resolution: probabilities are resolved to multiples of 2^-32


def _cumulative(p):
    # integer thresholds make inverse-cdf sampling exact: each row ends at exactly 2^32, a
    # zero-probability column repeats its left neighbour's threshold and can never be drawn
    c = np.cumsum(p, axis=-1)
    return np.round(c / c[..., -1:] * _ONE).astype(np.int64)


def build_table(corpus=None, n_triggers=3):
    """Measure the character bigram table of `corpus`; cached in memory so train and val share it."""
    files = _corpus_files(corpus)
    key = (tuple(str(f) for f in files), int(n_triggers))
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key]

    # codepoints of every file, fast: utf-32 bytes reinterpreted as uint32
    texts = [np.frombuffer(f.read_text(encoding="utf-8").encode("utf-32-le"), dtype=np.uint32) for f in files]
    codepoints = np.unique(np.concatenate(texts)) if texts else np.zeros(0, np.uint32)
    n_chars = len(codepoints)
    if n_triggers < 1 or n_triggers >= n_chars:
        raise ValueError(f"bigram_backcopy: n_triggers must be in [1, {n_chars - 1}] for a corpus of "
                         f"{n_chars} distinct characters, got {n_triggers}")
    vocab_size = n_chars + 1
    bos = n_chars

    # pairs are counted within each file only: the end of one play does not lead into the next
    pair_counts = np.zeros(vocab_size * vocab_size, dtype=np.int64)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for cps in texts:
        ids = np.searchsorted(codepoints, cps)
        counts += np.bincount(ids, minlength=vocab_size)
        pair_counts += np.bincount(ids[:-1] * vocab_size + ids[1:], minlength=vocab_size * vocab_size)
    pair_counts = pair_counts.reshape(vocab_size, vocab_size)

    unigram = counts / counts.sum()
    row_totals = pair_counts.sum(1, keepdims=True)
    # a character seen only at the very end of a file has no successor; fall back to the unigram
    probs = np.where(row_totals > 0, pair_counts / np.maximum(row_totals, 1), unigram[None, :])
    probs[bos] = unigram  # BOS column stays 0: nothing ever transitions into BOS

    # triggers: the most frequent characters; ties broken by character order so it is deterministic
    order = np.argsort(-counts[:n_chars], kind="stable")
    triggers = order[:n_triggers].astype(np.int64)
    is_trigger = np.zeros(vocab_size, dtype=bool)
    is_trigger[triggers] = True

    first_probs = np.where(is_trigger, 0.0, unigram)
    first_probs /= first_probs.sum()

    table = BigramTable(
        chars=[chr(c) for c in codepoints], counts=counts, probs=probs, first_probs=first_probs,
        # rows laid end to end (row a shifted by a * 2^32) so one searchsorted samples a whole batch of rows
        cdf_flat=(_cumulative(probs) + np.arange(vocab_size)[:, None] * _ONE).ravel(),
        first_cdf=_cumulative(first_probs), triggers=triggers, is_trigger=is_trigger,
    )
    _TABLE_CACHE[key] = table
    return table


def bayes_loss_per_position(table, block_size):
    """
    Exact expected cross-entropy (nats) of the Bayes-optimal predictor at each of the
    block_size predicted positions (position i predicts seq[i+1] from seq[:i+1]).
    The next token depends on the current one, and on the previous one after a trigger,
    so we carry the joint law J[a, b] = P(seq[t-1] = a, seq[t] = b) forward in time.
    """
    p, trig = table.probs, table.is_trigger
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    row_entropy = -plogp.sum(1)
    row_entropy[trig] = 0.0  # after a trigger the next token is a known copy
    first_entropy = -np.sum(table.first_probs[table.first_probs > 0] * np.log(table.first_probs[table.first_probs > 0]))

    losses = np.zeros(block_size)
    losses[0] = first_entropy
    joint = np.zeros_like(p)
    joint[-1] = table.first_probs  # (seq[0], seq[1]) = (BOS, first)
    for i in range(1, block_size):
        marginal = joint.sum(0)  # law of seq[i]
        losses[i] = marginal @ row_entropy
        # next pair (seq[i], seq[i+1]): sampled from the bigram row, or copied from seq[i-1]
        joint = np.where(trig[:, None], joint.T, marginal[:, None] * p)
    return losses


# -----------------------------------------------------------------------------
# the data loader

class BigramBackcopy:

    def __init__(self, split, batch_size, block_size, *, seed=1337, n_triggers=3, corpus=None,
                 device="cpu", rank=0, world_size=1):
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"bigram_backcopy: batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"bigram_backcopy: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)

        self.table = build_table(corpus, n_triggers)
        self.vocab_size = len(self.table.chars) + 1
        self.bos_token = len(self.table.chars)
        self.triggers = torch.from_numpy(self.table.triggers.copy())
        self.trigger_chars = [self.table.chars[i] for i in self.table.triggers]
        self.meta = {
            "tokenizer": "char",
            "chars": list(self.table.chars),
            "bos_token": self.bos_token,
            "vocab_size": self.vocab_size,
            "triggers": self.table.triggers.tolist(),
            "dataset": "bigram_backcopy",
        }
        self.bayes_loss_per_position = bayes_loss_per_position(self.table, block_size)
        self.bayes_loss = float(self.bayes_loss_per_position.mean())

        # one stream per (seed, split), shared by all DDP ranks: each draws the global batch and keeps its own
        # rows, so N processes see exactly the batches of one process with an N times larger batch.
        # crc32 gives a split code that is stable across runs (Python's hash() of a str is salted per process)
        seq = np.random.SeedSequence([seed, zlib.crc32(split.encode())])
        self.rng = np.random.Generator(np.random.PCG64(seq))
        self._is_trigger_on = {}  # device -> bool lookup tensor

    def sample(self, batch_size):
        """Draw (batch_size, block_size + 1) int64 sequences as a numpy array."""
        t_len, tab, V = self.block_size + 1, self.table, self.vocab_size
        # a fixed number of draws per batch keeps the stream position independent of the content
        u = self.rng.integers(0, _ONE, size=(t_len - 1, batch_size), dtype=np.int64)
        seq = np.empty((t_len, batch_size), dtype=np.int64)  # time-major: each step touches contiguous rows
        seq[0] = self.bos_token
        if t_len > 1:
            seq[1] = np.searchsorted(tab.first_cdf, u[0], side="right")
        for t in range(2, t_len):
            prev = seq[t - 1]
            # inverse-cdf draw from row prev: the first threshold of that row above u
            drawn = np.searchsorted(tab.cdf_flat, prev * _ONE + u[t - 1], side="right") - prev * V
            seq[t] = np.where(tab.is_trigger[prev], seq[t - 2], drawn)
        return np.ascontiguousarray(seq.T)

    def next_batch(self):
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        seq = torch.from_numpy(self.sample(self.batch_size * self.world_size)[rows])
        x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self):
        # the PCG64 state alone fixes every future batch; split/seed/rank are kept for inspection
        return {"split": self.split, "seed": self.seed, "rank": self.rank,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]

    def trigger_mask(self, x):
        """True where x[:, t] is a trigger, i.e. where y[:, t] is the back-copy x[:, t-1]."""
        lookup = self._is_trigger_on.get(x.device)
        if lookup is None:
            lookup = torch.from_numpy(self.table.is_trigger.copy()).to(x.device)
            self._is_trigger_on[x.device] = lookup
        return lookup[x]

    @torch.no_grad()
    def eval_metrics(self, logits, x, y):
        """Mean cross-entropy split into back-copy (trigger) positions and bigram (all other) positions."""
        if logits.shape[:2] != x.shape or y.shape != x.shape:
            raise ValueError(f"bigram_backcopy: logits {tuple(logits.shape)} do not match x {tuple(x.shape)} / y {tuple(y.shape)}")
        # logits may carry padded vocabulary columns (nanoGPT rounds vocab_size up); CE over them is fine
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        mask = self.trigger_mask(x).reshape(-1)
        def mean_or_nan(v):
            return v.mean().item() if v.numel() else math.nan
        return {"backcopy_loss": mean_or_nan(ce[mask]), "bigram_loss": mean_or_nan(ce[~mask])}

