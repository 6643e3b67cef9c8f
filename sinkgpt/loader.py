"""
Batches for training, evaluation and analysis: random (B, T) windows of a prepared dataset (see prep.py for the
format), or the Bigram-Backcopy generator, through one factory.

    loader = make_loader("shakespeare_char", "train", batch_size=12, block_size=256, device="cuda")
    x, y = loader.next_batch()                           # int64 (B, T), y = x shifted by one
    ckpt["loader"] = loader.state_dict()                 # plain ints/str: fine for weights_only=True

May import: sinkgpt.common, sinkgpt.prep, sinkgpt.bigram_backcopy.
"""
import glob
import os
import zlib

import numpy as np
import torch

from sinkgpt import prep
from sinkgpt.common import InputError

STATE_VERSION = 1


class DataError(InputError):
    """A dataset that is missing or cannot supply the batches asked for."""


def make_loader(dataset, split, batch_size, block_size, *, seed=1337, prepend_bos=False, align_to_docs=False,
                bb_triggers=3, device="cpu", rank=0, world_size=1, bos_loss=True):
    """The batches of a dataset's split: a prepared dataset (a name under data/ or a folder holding meta.json;
    the bundled ones are prepared on first use) or 'bigram_backcopy' (generated on the fly). DataError, one line,
    for missing data or a split too short for the windows."""
    if dataset == "bigram_backcopy":
        from sinkgpt.bigram_backcopy import BigramBackcopy
        try:
            return BigramBackcopy(split, batch_size, block_size, seed=seed, n_triggers=bb_triggers, device=device,
                                  rank=rank, world_size=world_size)
        except ValueError as e:  # a trigger count the corpus cannot supply
            raise DataError(f"config key 'bb_triggers': {e}") from None
    try:
        return TokenLoader(open_dataset(dataset), split, batch_size, block_size, seed=seed, prepend_bos=prepend_bos,
                           align_to_docs=align_to_docs, device=device, rank=rank, world_size=world_size,
                           bos_loss=bos_loss)
    except (FileNotFoundError, ValueError) as e:  # not prepared; no window of block_size + 1 tokens in a split
        raise DataError(str(e)) from None


def loader_for_run(cfg, split, device, rank=0, world_size=1):
    """make_loader with a training config's data keys."""
    return make_loader(cfg["dataset"], split, cfg["batch_size"], cfg["block_size"], seed=cfg["seed"],
                       prepend_bos=cfg["prepend_bos"], align_to_docs=cfg["align_to_docs"],
                       bb_triggers=cfg["bb_triggers"], device=device, rank=rank, world_size=world_size,
                       bos_loss=cfg["bos_loss"])


def open_dataset(dataset, data_root="data", auto_prepare=True):
    """Folder of a prepared dataset: a path holding meta.json, or data_root/<dataset>; the bundled
    shakespeare / shakespeare_char are prepared on first use when auto_prepare is on."""
    if os.path.isfile(os.path.join(dataset, "meta.json")):
        return dataset
    if auto_prepare:
        return prep.ensure_prepared(dataset, data_root)
    data_dir = prep.resolve_data_dir(dataset, data_root)
    prep.read_meta(data_dir)  # raises the error naming the prepare command
    return data_dir


def shard_paths(data_dir, meta, split):
    """Token files of a split: as listed in meta.json, else found by name (split.bin or split_NNN.bin)."""
    names = meta.get("shards", {}).get(split)
    if names is None:
        paths = glob.glob(os.path.join(data_dir, f"{split}.bin")) + \
            sorted(glob.glob(os.path.join(data_dir, f"{split}_[0-9]*.bin")))
    else:
        paths = [os.path.join(data_dir, name) for name in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if not paths or missing:
        what = f"{', '.join(os.path.basename(p) for p in missing)} missing" if missing else f"no {split} token files"
        raise FileNotFoundError(f"{prep.display_path(data_dir)}: {what}: rerun {prep.prepare_command(data_dir)}")
    return paths


def doc_starts(bin_path, tokens, bos_token):
    """Positions of the EOT tokens that start documents: the .docs.npy index, or a scan."""
    index_path = prep.doc_index_path(bin_path)
    if os.path.exists(index_path):
        return np.load(index_path).astype(np.int64)
    return np.flatnonzero(tokens == bos_token).astype(np.int64)


class TokenLoader:
    """Random windows of one split. Random mode: a uniform offset over all shards (so shards are
    weighted by length); align_to_docs: a uniform document start. Under DDP every rank draws the offsets of
    the whole global batch from the same stream and reads only its own rows: ranks read different data, and a
    run on N processes sees exactly the batches of a single process with an N times larger batch."""

    def __init__(self, data_dir, split, batch_size, block_size, *, seed=1337, prepend_bos=False,
                 align_to_docs=False, device="cpu", rank=0, world_size=1, bos_loss=True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.data_dir, self.split = data_dir, split
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.prepend_bos, self.align_to_docs, self.bos_loss = prepend_bos, align_to_docs, bos_loss
        self.device = torch.device(device)
        self.meta = prep.read_meta(data_dir)
        self.vocab_size, self.bos_token = int(self.meta["vocab_size"]), int(self.meta["bos_token"])
        # tokens read per row: with prepend_bos (unaligned) the bos is supplied, not read
        self.span = block_size if prepend_bos and not align_to_docs else block_size + 1

        # one memmap per shard, opened once (np.memmap cannot map an empty file: skip those)
        paths = [p for p in shard_paths(data_dir, self.meta, split) if os.path.getsize(p) > 0]
        self.shards = [np.memmap(p, dtype=np.uint16, mode="r") for p in paths]
        if align_to_docs:
            # candidate window starts: document starts with a full window after them, all shards
            # concatenated so that a uniform pick over them indexes this array directly
            starts = [doc_starts(p, t, self.bos_token) for p, t in zip(paths, self.shards)]
            starts = [s[s + self.span <= len(t)] for s, t in zip(starts, self.shards)]
            self.doc_starts = np.concatenate(starts) if starts else np.empty(0, dtype=np.int64)
            counts = [len(s) for s in starts]
        else:
            counts = [max(0, len(tokens) - self.span + 1) for tokens in self.shards]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.cum_counts = np.cumsum(self.counts)
        if not self.shards or self.cum_counts[-1] == 0:
            total = sum(len(t) for t in self.shards)
            what = "document start followed by" if align_to_docs else "window of"
            raise ValueError(f"{split} split of {prep.display_path(data_dir)} ({total:,} tokens) has no "
                             f"{what} {self.span} tokens: lower block_size")
        self.rng = np.random.Generator(np.random.PCG64(self.stream_seed()))
        self.batches_drawn = 0

    def stream_seed(self, *extra):
        # crc32, not hash(): Python's str hash changes between processes
        base = self.seed + zlib.crc32(self.split.encode())
        return [base, *extra] if extra else base

    def sample_positions(self):
        """(shard index, token offset) of each of this rank's rows of the global batch."""
        picks = self.rng.integers(0, self.cum_counts[-1], size=self.batch_size * self.world_size)
        picks = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        shard_ids = np.searchsorted(self.cum_counts, picks, side="right")
        if self.align_to_docs:
            return shard_ids, self.doc_starts[picks]
        first_pick = self.cum_counts[shard_ids] - self.counts[shard_ids]
        return shard_ids, picks - first_pick

    def read_windows(self, shard_ids, offsets):
        """(B, span) tokens: one fancy-indexed read per shard touched, not one per row."""
        windows = np.empty((self.batch_size, self.span), dtype=np.int64)
        steps = np.arange(self.span, dtype=np.int64)
        for shard in np.unique(shard_ids):
            rows = np.flatnonzero(shard_ids == shard)
            windows[rows] = self.shards[shard][offsets[rows, None] + steps]
        return windows

    def next_batch(self):
        windows = self.read_windows(*self.sample_positions())
        xy = np.empty((2, self.batch_size, self.block_size), dtype=np.int64)  # one host->device copy
        if self.span == self.block_size:  # prepend_bos: x = [bos] + w[:-1], y = w
            xy[0, :, 0] = self.bos_token
            xy[0, :, 1:] = windows[:, :-1]
            xy[1] = windows
            if not self.bos_loss:  # the first token predicted from BOS alone is left out of the loss
                xy[1, :, 0] = -1  # (cross_entropy's ignore_index): the targets a BOS-free model also predicts
        else:
            xy[0], xy[1] = windows[:, :-1], windows[:, 1:]
        self.batches_drawn += 1
        xy = torch.from_numpy(xy)
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            xy = xy.to(self.device)
        return xy[0], xy[1]

    def state_dict(self):
        return {"version": STATE_VERSION, "split": self.split, "seed": self.seed, "rank": self.rank,
                "batches_drawn": self.batches_drawn, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        if state.get("version") != STATE_VERSION or state.get("rng", {}).get("bit_generator") != "PCG64":
            raise ValueError("loader state is not from this TokenLoader version")
        if state["split"] != self.split:
            raise ValueError(f"loader state is for split {state['split']!r}, not {self.split!r}")
        self.batches_drawn = int(state["batches_drawn"])
        if state["seed"] == self.seed:  # all ranks share one stream, so any rank's state continues it exactly
            self.rng.bit_generator.state = state["rng"]
        else:  # the seed was changed on resume: a fresh, deterministic stream for the new seed
            self.rng = np.random.Generator(np.random.PCG64(self.stream_seed(self.batches_drawn)))
