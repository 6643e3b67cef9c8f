"""
Train a GPT (plain GPT-2 or with dedicated sink options) on one device or with DDP.

    python train.py config/train_shakespeare_char.py --key=value ...
    torchrun --standalone --nproc_per_node=2 train.py config/...

Writes out_dir/config.json (the resolved config), out_dir/metrics.jsonl (one JSON object per log/eval event)
and out_dir/ckpt.pt (atomic; resumable bit for bit with init_from='resume'; keep_checkpoints=N also keeps
out_dir/ckpt_<iter>.pt every N iterations, for analyze.py trajectory); wandb_log=True also sends the
metrics.jsonl events to Weights & Biases. Ctrl-C or SIGTERM saves a checkpoint before exiting; a NaN/inf loss
stops the run and leaves the last good checkpoint intact.

train() reads top to bottom: set-up, data, restore or init, wrap, logging and tracking, the loop. The pieces
live in the sinkgpt package (training, checkpoint, runtime, optim, tracking).
"""

import json
import math
import os
import signal
import sys

import torch

from sinkgpt.checkpoint import (CHECKPOINT_KEYS, MetricsLog, checkpoint_path, kept_name, load_checkpoint,
                                rank_rng_states, save_checkpoint)
from sinkgpt.common import InputError, RunError
from sinkgpt.config import load_config
from sinkgpt.live_log import wandb_sender
from sinkgpt.loader import loader_for_run
from sinkgpt.optim import MomentEditor, build_optimizer, set_lr
from sinkgpt.runtime import (all_reduce_mean, any_rank, check_fits, peak_flops, setup_runtime, synchronize,
                             teardown_distributed, use_compile, wrap_ddp)
from sinkgpt.training import (FixedBatches, StopSignal, Throughput, build_model, evaluate, lr_at,
                              micro_steps_per_rank, prepare_out_dir, restore_progress, seed_rank, train_step)


def train(cfg):
    # ---- set-up: processes, device and precision, the run's folder ----------------------------------------
    rt = setup_runtime(cfg)
    accum_steps = micro_steps_per_rank(cfg, rt.world_size)
    seed_rank(cfg, rt.rank)
    out_dir = cfg["out_dir"]
    resuming = cfg["init_from"] == "resume"
    prepare_out_dir(out_dir, resuming or cfg["eval_only"])
    checkpoint = None
    if resuming:
        checkpoint = load_checkpoint(checkpoint_path(cfg["resume_from"] or out_dir), keys=CHECKPOINT_KEYS)

    # ---- data: this rank's training batches, and fixed batches for every evaluation --------------------------
    train_loader = loader_for_run(cfg, "train", rt.device, rt.rank, rt.world_size)
    eval_batches = {split: FixedBatches(loader_for_run(cfg, split, rt.device, rt.rank, rt.world_size))
                    for split in ("train", "val")}

    # ---- restore or init: the model, the optimizer and where the run stands ---------------------------------
    model = build_model(cfg, train_loader.vocab_size, train_loader.bos_token, checkpoint, train_loader.meta)
    n_params = sum(p.numel() for p in model.parameters())
    check_fits(16 * n_params, rt.device, f"training {n_params / 1e6:.0f}M parameters (float32 weights, gradients "
                                         "and two AdamW moments, activations not counted)")
    model = model.to(rt.device)
    optimizer = build_optimizer(model, cfg, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=(rt.dtype == "float16"))
    progress = restore_progress(cfg, checkpoint, optimizer, scaler, train_loader, rt)
    checkpoint = None  # free memory
    resumed_at = progress.iter_num if resuming else None

    # ---- wrap: compile and DDP (raw_model stays the module that is saved, measured and clipped) --------------
    raw_model = model
    if use_compile(cfg["compile"], rt.device_type):
        model = torch.compile(model)
    if rt.world_size > 1:
        model = wrap_ddp(model, rt.device)

    # ---- logging, tracking and optimizer-state interventions (each free when off) ----------------------------
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * accum_steps * rt.world_size
    throughput = Throughput(tokens_per_iter, raw_model.flops_per_token(cfg["block_size"]) * tokens_per_iter,
                            peak_flops(rt.device), rt.world_size)
    log = open_log(cfg, rt, resumed_at) if rt.master else MetricsLog(None)
    if rt.master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens/iter, device {rt.device}, "
              f"{rt.dtype}, world size {rt.world_size}"
              + (f", resuming at iter {progress.iter_num}" if resumed_at is not None else ""))
        if hasattr(train_loader, "bayes_loss"):
            log.write(iter=progress.iter_num, bayes_loss=train_loader.bayes_loss)
            print(f"Bayes-optimal loss of the process: {train_loader.bayes_loss:.4f}")
    tracker = editor = None
    try:
        if cfg["track_interval"] > 0 and rt.master:
            from sinkgpt.tracking import Tracker  # imported only when tracking is on
            tracker = Tracker(raw_model, optimizer, cfg, eval_batches["val"].loader, progress.iter_num)
        if cfg["moment_edits"] or cfg["reset_optimizer_at"] or cfg["param_decay"]:  # every rank: replicas stay equal
            editor = MomentEditor(raw_model, optimizer, cfg["moment_edits"], cfg["reset_optimizer_at"],
                                  cfg["param_decay"])
    except ValueError as e:
        raise RunError(str(e)) from None
    if tracker is not None and log.kept == 0:  # a new log: its curves start where the run starts (a retrofit's
        log.write(iter=progress.iter_num, tokens=progress.tokens, **tracker.start_record())  # step 0, a continuation)

    def save(name="ckpt.pt"):  # every rank calls it (each one's RNG state goes in); rank 0 writes
        rng_states = rank_rng_states(rt.device, rt.world_size)
        if rt.master:
            save_checkpoint(os.path.join(out_dir, name), raw_model, optimizer, cfg, progress, train_loader.meta,
                            rng_states, scaler)

    def fetch():  # the next batch, remembering the loader state that reproduces it (what a checkpoint stores)
        progress.loader = train_loader.state_dict()
        return train_loader.next_batch()

    # ---- the loop ---------------------------------------------------------------------------------------------
    if rt.master and resumed_at is not None and resumed_at > cfg["max_iters"] and not cfg["eval_only"]:
        print(f"the checkpoint is at iter {resumed_at}, past max_iters={cfg['max_iters']}: nothing to train "
              f"(raise --max_iters to continue)")
    stop = StopSignal()
    batch = fetch()
    throughput.restart()
    while True:
        it = progress.iter_num
        lr = lr_at(it, cfg)
        set_lr(optimizer, lr, cfg)  # lr * each group's lr_mult; Muon groups follow muon_lr

        # evaluate (and checkpoint) every eval_interval, at the end, or once for eval_only
        if it % cfg["eval_interval"] == 0 and it != resumed_at or it == cfg["max_iters"] or cfg["eval_only"]:
            losses = evaluate(model, eval_batches, cfg["eval_iters"], rt.autocast, rt.world_size)
            if not math.isfinite(losses["val_loss"]):
                raise RunError(f"val loss is {losses['val_loss']} at iter {it}; stopping, {kept_checkpoint(out_dir)}")
            improved = losses["val_loss"] < progress.best_val_loss
            progress.best_val_loss = min(progress.best_val_loss, losses["val_loss"])
            if rt.master:
                print(f"step {it}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}")
                log.write(iter=it, tokens=progress.tokens, lr=lr, best_val_loss=progress.best_val_loss, **losses)
            if it > 0 and (improved or cfg["always_save_checkpoint"]) and not cfg["eval_only"]:
                save()  # the losses are averaged over the ranks: every rank takes this branch
            throughput.restart()  # evaluation time is not training time

        # keep a copy every keep_checkpoints iterations (step 0 included): the run's trajectory, beside ckpt.pt
        if keeps_at(it, cfg) and it != resumed_at:
            save(kept_name(it))
            throughput.restart()
        if it >= cfg["max_iters"] or cfg["eval_only"]:  # >=: a checkpoint may be past a lowered max_iters
            break

        # one optimizer step, then the interventions and tracking that follow it
        step = train_step(model, optimizer, scaler, batch, fetch, accum_steps, rt.autocast, cfg["grad_clip"],
                          raw_model.parameters(), before_update=tracker.before_update if tracker else None)
        batch = step.next_batch
        progress.iter_num += 1
        progress.tokens += tokens_per_iter
        throughput.tick()
        if editor is not None:
            editor.apply(progress.iter_num)
        record = tracker.after_step(progress.iter_num) if tracker is not None else None
        if record is not None:
            log.write(iter=progress.iter_num, tokens=progress.tokens, **record)

        # the log line: one host sync every log_interval iterations
        logged = progress.iter_num % cfg["log_interval"] == 0 or progress.iter_num == cfg["max_iters"]
        if logged:
            loss = all_reduce_mean(step.loss, rt.world_size).item()
            if not math.isfinite(loss):
                raise RunError(f"loss is {loss} at iter {progress.iter_num}; stopping, {kept_checkpoint(out_dir)}")
            synchronize(rt.device)
            ms_per_iter, tokens_per_s, mfu = throughput.lap()
            if rt.master:
                mfu_text = f", mfu {100 * mfu:.1f}%" if mfu is not None else ""
                print(f"iter {progress.iter_num}: loss {loss:.4f}, lr {lr:.2e}, {ms_per_iter:.1f} ms/iter, "
                      f"{tokens_per_s:,.0f} tok/s{mfu_text}")
                log.write(iter=progress.iter_num, tokens=progress.tokens, lr=lr, train_loss=loss,
                          ms_per_iter=ms_per_iter, tokens_per_s=tokens_per_s, mfu=mfu,
                          grad_norm=None if step.grad_norm is None else step.grad_norm.item())

        # Ctrl-C / SIGTERM: save where the run stands and stop. A signal may reach the ranks at different
        # iterations, so under DDP they agree on the stop, at log iterations (a host sync there already)
        if (rt.world_size == 1 or logged) and any_rank(stop.received, rt.world_size, rt.device):
            save_on_stop(stop.received or "a signal to another process", progress.iter_num, cfg, raw_model, save,
                         rt.master)
            return 130
    return 0


def open_log(cfg, rt, resumed_at):
    """metrics.jsonl (and config.json) of the run; eval_only is a measurement and leaves the folder as it is."""
    if cfg["eval_only"]:
        return MetricsLog(None)
    send = wandb_sender(cfg) if cfg["wandb_log"] else None  # live logging, rank 0 only; checked before any file
    with open(os.path.join(cfg["out_dir"], "config.json"), "w") as f:
        json.dump(dict(cfg, world_size=rt.world_size, device_resolved=rt.device, dtype_resolved=rt.dtype), f,
                  indent=2)
    return MetricsLog(os.path.join(cfg["out_dir"], "metrics.jsonl"), resumed_at, send)


def keeps_at(it, cfg):
    """Whether iteration `it` keeps a copy of its checkpoint (keep_checkpoints=N: every multiple of N)."""
    return cfg["keep_checkpoints"] > 0 and it % cfg["keep_checkpoints"] == 0 and not cfg["eval_only"]


def kept_checkpoint(out_dir):
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        return f"the last good checkpoint in {out_dir} is untouched"
    return "no checkpoint was written"


def save_on_stop(signal_name, iter_num, cfg, raw_model, save, master):
    """The stop signal's checkpoint (every rank calls it, rank 0 writes and reports): ckpt.pt, or with
    always_save_checkpoint=False ckpt_stop.pt beside the best-val ckpt.pt (which keeps what it promises)."""
    out_dir = cfg["out_dir"]
    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):  # the same replicas: every rank agrees
        raise RunError(f"{signal_name}: parameters are not finite, checkpoint not written")
    name = "ckpt.pt" if cfg["always_save_checkpoint"] else "ckpt_stop.pt"
    best = " (ckpt.pt keeps the best val loss)" if name != "ckpt.pt" and os.path.exists(
        os.path.join(out_dir, "ckpt.pt")) else ""
    save(name)
    if not master:
        return
    if name == "ckpt.pt":
        print(f"{signal_name} at iter {iter_num}: checkpoint saved to {out_dir}/ckpt.pt")
        return
    print(f"{signal_name} at iter {iter_num}: checkpoint saved to {out_dir}/ckpt_stop.pt{best}; "
          f"continue with --init_from=resume --resume_from={out_dir}/ckpt_stop.pt")


def main(argv):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # train() installs its own
    code = 1
    try:
        code = train(load_config(argv))
    except InputError as e:  # config, data, checkpoint, device: one line (missing data names its prepare command)
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # before the loop's own handler is installed, or a second Ctrl-C: nothing to save
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        teardown_distributed(success=code == 0)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
