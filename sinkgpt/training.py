"""
The pieces train.py's loop is made of: the run folder, the model to start from (scratch, a checkpoint or a
pretrained folder), the learning-rate schedule, evaluation on fixed batches, the training step (micro-steps,
clipping, the optimizer step; bench.py times the same function) and the stop signal.

May import: model, sinkgpt.checkpoint, sinkgpt.common, sinkgpt.config, sinkgpt.optim,
sinkgpt.pretrained, sinkgpt.runtime, sinkgpt.tokenizer.
"""

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass

import torch

from model import GPT
from sinkgpt.checkpoint import (TrainProgress, checkpoint_path, kept_checkpoints, load_checkpoint, model_from_checkpoint,
                                pretrained_meta, saved_rng_states, set_rng_state)
from sinkgpt.common import RunError
from sinkgpt.config import DEFAULTS, MODEL_KEYS, ConfigError, given, model_config
from sinkgpt.optim import load_optimizer_state
from sinkgpt.pretrained import from_pretrained, resolve_folder
from sinkgpt.runtime import all_reduce_mean
from sinkgpt.tokenizer import describe_tokenizer, tokenizer_identity


# ----------------------------------------------------------------------------------------------------
# set-up


def prepare_out_dir(out_dir, resuming):
    """Create out_dir, or stop with one line: it is not a writable folder, or a fresh run would overwrite the
    checkpoint of a run already there."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise RunError(f"out_dir {out_dir!r} cannot be created: {e.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise RunError(f"out_dir {out_dir!r} is not writable")
    held = [name for name in ("ckpt.pt", "ckpt_stop.pt") if os.path.exists(os.path.join(out_dir, name))]
    held += [os.path.basename(path) for _, path in kept_checkpoints(out_dir)]
    if not resuming and held:
        raise RunError(f"{out_dir} already holds a run ({held[0]}): continue it with --init_from=resume, or give "
                       f"another --out_dir (or delete that run)")


def micro_steps_per_rank(cfg, world_size):
    """gradient_accumulation_steps is global (nanoGPT's convention): the micro-batches of one optimizer step over
    all processes, so a multiple of world_size; each process runs its share."""
    steps = cfg["gradient_accumulation_steps"]
    if steps % world_size:
        below, above = steps // world_size * world_size, (steps // world_size + 1) * world_size
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ConfigError(f"gradient_accumulation_steps={steps} counts the micro-batches of all processes and must "
                          f"be a multiple of the {world_size} processes: use --gradient_accumulation_steps={nearest}")
    return steps // world_size


# ----------------------------------------------------------------------------------------------------
# restore or init


# what a run may add to a pretrained model (new parameters start at their neutral point); every other model key
# is the folder's architecture, which a config may repeat but not change
PRETRAINED_OPTIONS = ("sink", "n_sink_tokens", "attn_gate", "attn_fn", "qk_norm", "logit_softcap", "dropout",
                      "pad_vocab", "pos_offset")


def build_model(cfg, vocab_size, bos_token, checkpoint=None, data_meta=None):
    """The model a run starts from: the checkpoint's (resume), a fresh one (scratch), the weights of another run
    or checkpoint (init_from a run folder or .pt file: iteration 0, fresh optimizer), or a pretrained folder with
    this config's options (sinks, gates, dropout, ...) added. The data must be in the model's own tokenizer."""
    if checkpoint is not None:
        saved = checkpoint["model_args"]
        check_model_keys(cfg, saved, "the checkpoint's", "resume with the checkpoint's model settings")
        if given(cfg, "dropout"):
            checkpoint = dict(checkpoint, model_args=dict(saved, dropout=cfg["dropout"]))
        if saved["vocab_size"] < vocab_size:  # as for a pretrained start: the model must hold the data's ids
            raise RunError(f"checkpoint vocab_size {saved['vocab_size']} does not match dataset "
                           f"'{cfg['dataset']}' ({vocab_size})")
        check_same_tokenizer(checkpoint.get("meta"), data_meta, "the checkpoint", cfg)
        return model_from_checkpoint(checkpoint, os.path.join(cfg["out_dir"], "ckpt.pt"))
    if cfg["init_from"] == "scratch":
        return GPT(model_config(cfg, vocab_size, bos_token))
    source = cfg["init_from"]
    if is_checkpoint_target(source):  # a run's weights (a converted model is one): its architecture as it is
        start = load_checkpoint(checkpoint_path(source), keys=("model", "model_args", "meta"))
        check_model_keys(cfg, start["model_args"], f"{source}'s", "a run started from weights keeps their model "
                         "settings (leave the key out)", also_allowed=("block_size",))
        model, model_meta = model_from_checkpoint(start, source), lambda: start["meta"]
    else:
        folder = resolve_folder(source)  # a hub name: the folder it was fetched into
        model = from_pretrained(folder, **{k: cfg[k] for k in PRETRAINED_OPTIONS})
        check_model_keys(cfg, model.config.to_dict(), f"{folder}'s", "a pretrained model keeps its architecture "
                         "(leave the key out)", also_allowed=PRETRAINED_OPTIONS + ("block_size",))
        source, model_meta = folder, lambda: pretrained_meta(folder, model)
    if model.config.vocab_size < vocab_size:
        raise RunError(f"{source} has vocab_size {model.config.vocab_size} but dataset '{cfg['dataset']}' has "
                       f"{vocab_size}: prepare the data with the model's tokenizer (--tokenizer {source})")
    if data_meta is not None:
        check_same_tokenizer(model_meta(), data_meta, source, cfg)
    if model.config.pos_offset and (cfg["prepend_bos"] or cfg["align_to_docs"]):
        raise RunError(f"{source} starts its tokens at position {model.config.pos_offset} (its BOS is a slot): "
                       "train it on windows without BOS (prepend_bos=False, align_to_docs=False)")
    if cfg["block_size"] > model.config.block_size:  # no position beyond the model's own context is trained
        raise RunError(f"config key 'block_size'={cfg['block_size']} is longer than {source}'s context "
                       f"({model.config.block_size}): give --block_size={model.config.block_size} or less")
    if cfg["block_size"] < model.config.block_size:
        model.crop_block_size(cfg["block_size"])
    return model


def is_checkpoint_target(target):
    """A sinkgpt run folder (with ckpt.pt) or a checkpoint file, as opposed to a pretrained folder or hub name."""
    return os.path.isfile(target) or os.path.isfile(os.path.join(target, "ckpt.pt"))


def check_model_keys(cfg, saved, whose, hint, also_allowed=("dropout",)):
    """Model keys this run names (a config file or flag, even at its default) must agree with the model it starts
    from."""
    for key in MODEL_KEYS:
        if key not in also_allowed and given(cfg, key) and cfg[key] != saved.get(key, DEFAULTS[key]):
            raise RunError(f"config key '{key}'={cfg[key]!r} differs from {whose} "
                           f"{saved.get(key, DEFAULTS[key])!r}; {hint}")


def check_same_tokenizer(model_meta, data_meta, what, cfg):
    """A model trains only on data of its own tokenizer (same ids for the same text), never silently on another."""
    if not model_meta or not data_meta or tokenizer_identity(model_meta) == tokenizer_identity(data_meta):
        return
    hint = ""
    if cfg["init_from"] not in ("scratch", "resume"):
        hint = (f"; prepare it with --tokenizer {cfg['init_from']}" if model_meta.get("tokenizer") == "hf" else
                "; use a GPT-2 BPE dataset (shakespeare, english_mix, ...)")
    raise RunError(f"dataset '{cfg['dataset']}' is tokenized with {describe_tokenizer(data_meta)}, but {what} uses "
                   f"{describe_tokenizer(model_meta)}{hint}")


def restore_progress(cfg, checkpoint, optimizer, scaler, train_loader, rt):
    """The progress to start from: zero for a new run; for a resume the checkpoint's iteration, best val loss,
    token count, data position, each rank's RNG state, the gradient scaler and (unless reset_optimizer) the
    optimizer state."""
    if checkpoint is None:
        return TrainProgress(loader=train_loader.state_dict())
    if not cfg["reset_optimizer"]:  # reset_optimizer: fresh moments (also lets a resume switch optimizer)
        try:
            load_optimizer_state(optimizer, checkpoint["optimizer"])
        except ValueError as e:
            raise RunError(str(e)) from None
    if scaler.is_enabled() and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    progress = TrainProgress.from_checkpoint(checkpoint)
    try:
        train_loader.load_state_dict(progress.loader)
    except (ValueError, KeyError) as e:
        raise RunError(f"the checkpoint's data position does not fit dataset '{cfg['dataset']}' ({e}): "
                       f"resume on the dataset it was trained on") from None
    restore_rng(cfg, saved_rng_states(checkpoint), rt)
    return progress


def seed_rank(cfg, rank):
    """Each rank its own seed (nanoGPT's seed + rank), so DDP ranks draw different dropout masks; DDP itself
    starts every replica from rank 0's weights."""
    torch.manual_seed(cfg["seed"] + rank)


def restore_rng(cfg, states, rt):
    """Each rank's own saved state; a checkpoint from a different number of processes has none to match, so the
    ranks start fresh random states (and rank 0 says so)."""
    if len(states) == rt.world_size:
        set_rng_state(states[rt.rank], rt.device)
        return
    seed_rank(cfg, rt.rank)
    if rt.master:
        print(f"the checkpoint was saved by {len(states)} process(es) and this run has {rt.world_size}: each "
              f"process starts a fresh random state (seed {cfg['seed']} + rank), so dropout masks differ from an "
              "uninterrupted run")


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (0 = max_iters)."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= decay_iters:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


# ----------------------------------------------------------------------------------------------------
# evaluation and the training step


class FixedBatches:
    """A loader that restarts from the same state at every evaluation: every evaluation sees the same batches,
    so val losses compare across iterations and runs."""

    def __init__(self, loader):
        self.loader, self.start = loader, loader.state_dict()

    def restart(self):
        self.loader.load_state_dict(self.start)
        return self.loader


@torch.no_grad()
def evaluate(model, eval_batches, eval_iters, ctx, world_size):
    """{split}_loss: mean loss over eval_iters batches per split (and a Bigram-Backcopy val split's own metrics,
    {split}_backcopy_loss and {split}_bigram_loss), every figure averaged over the ranks in one all-reduce."""
    model.eval()
    out = {}
    for split, batches in eval_batches.items():
        loader = batches.restart()
        figures = {"loss": []}  # name -> one value per batch, on the device (read once, after the batches)
        for _ in range(eval_iters):
            x, y = loader.next_batch()
            with ctx:
                logits, loss = model(x, y)
            figures["loss"].append(loss.float())
            if split == "val" and hasattr(loader, "eval_metrics"):
                for key, value in loader.eval_metrics(logits, x, y).items():
                    figures.setdefault(key, []).append(loss.new_tensor(value, dtype=torch.float32))
        means = all_reduce_mean(torch.stack([torch.stack(values).mean() for values in figures.values()]), world_size)
        out.update({f"{split}_{key}": value for key, value in zip(figures, means.tolist())})
    model.train()
    return out


@dataclass
class StepResult:
    loss: torch.Tensor  # the last micro-batch's loss (on the device: reading it is a host sync)
    grad_norm: torch.Tensor | None  # before clipping; None when grad_clip is off
    next_batch: tuple  # the first micro-batch of the next step, already fetched


def train_step(model, optimizer, scaler, batch, fetch, accum_steps, ctx, grad_clip, clip_params,
               before_update=None):
    """One optimizer step: accum_steps micro-batches of forward and backward (under DDP gradients sync on the
    last one only), fetching each next batch while the device works; then clipping, `before_update()` (a
    tracker's snapshot), the optimizer step and zero_grad. `model` may be compiled or DDP-wrapped; clipping acts
    on clip_params (the raw model's)."""
    for micro_step in range(accum_steps):
        last = micro_step == accum_steps - 1
        no_sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with no_sync:
            with ctx:
                _, loss = model(*batch)
                loss = loss / accum_steps
            batch = fetch()
            scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip > 0:
        with torch.profiler.record_function("clip_grad_norm"):  # a name bench.py --profile counts as optimizer
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, grad_clip)
    if before_update is not None:
        before_update()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss.detach() * accum_steps, grad_norm, batch)


class Throughput:
    """ms/iter, tokens/s and MFU of the training iterations since the last log line (evaluation excluded).
    tokens_per_iter and flops_per_iter are the whole iteration's, over every process; peak_flops is one device's,
    so MFU is per device: the FLOPs over world_size devices' peak."""

    def __init__(self, tokens_per_iter, flops_per_iter, peak_flops, world_size=1):
        self.tokens_per_iter, self.flops_per_iter = tokens_per_iter, flops_per_iter
        self.peak = peak_flops * world_size if peak_flops else None
        self.restart()

    def restart(self):
        self.t0, self.iters = time.perf_counter(), 0

    def tick(self):
        self.iters += 1

    def lap(self):
        """(ms_per_iter, tokens_per_s, mfu or None) since the last lap or restart; then restarts."""
        elapsed = time.perf_counter() - self.t0
        ms_per_iter = 1000 * elapsed / self.iters
        tokens_per_s = self.tokens_per_iter * self.iters / elapsed
        mfu = self.flops_per_iter * self.iters / elapsed / self.peak if self.peak else None
        self.restart()
        return ms_per_iter, tokens_per_s, mfu


# ----------------------------------------------------------------------------------------------------
# stopping


class StopSignal:
    """Ctrl-C / SIGTERM ask the loop to save a checkpoint and stop after the current iteration (under DDP after
    the next log iteration, where the ranks agree on it); a second one stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
