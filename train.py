"""
Train a GPT (plain GPT-2 or with dedicated sink options) on one device or with DDP.

    python train.py config/train_shakespeare_char.py --key=value ...
    torchrun --standalone --nproc_per_node=2 train.py config/...

Writes out_dir/config.json (the resolved config), out_dir/metrics.jsonl (one JSON object per log/eval event)
and out_dir/ckpt.pt (atomic; resumable bit for bit with init_from='resume'). Ctrl-C or SIGTERM saves a
checkpoint before exiting; a NaN/inf loss stops the run and leaves the last good checkpoint intact.
"""

import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import time
from datetime import timedelta

import torch

from sinkgpt.config import MODEL_KEYS, ConfigError, load_config, model_config
from model import GPT, GPTConfig
from sinkgpt.optim import (MomentEditor, OptimizerTracker, as_iterations, build_optimizer, load_optimizer_state,
                   reset_optimizer_state, set_lr)

# dense bf16 peak FLOP/s of the accelerators we know (MFU is null elsewhere)
PEAK_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
              "GH200": 989e12, "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


class RunError(Exception):
    """A problem with the run's inputs (data, checkpoint, prompt): printed as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------------
# device, precision, distributed


def setup_distributed(cfg):
    """(rank, local_rank, world_size); initialises the process group when launched by torchrun."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 0, 1
    import torch.distributed as dist
    use_cuda = torch.cuda.is_available() and cfg["device"] in ("auto", "cuda")
    dist.init_process_group(backend=cfg["backend"] if use_cuda else "gloo",
                            timeout=timedelta(seconds=cfg["ddp_timeout"]))
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def mps_available():
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(requested, local_rank=0):
    """'auto' picks cuda, then mps, then cpu. A named device must exist on this machine (RunError otherwise);
    a bare 'cuda' means this process's GPU under torchrun, cuda:0 alone."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise RunError(f"device {requested!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"device {requested!r}: CUDA is not available here (use --device=cpu or auto)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RunError(f"device {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    if device.type == "mps" and not mps_available():
        raise RunError(f"device {requested!r}: MPS is not available here (use --device=cpu or auto)")
    if device.type not in ("cpu", "mps"):
        raise RunError(f"device {requested!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device.type


def keep_freed_memory():
    """Ask glibc to keep freed activation buffers instead of handing them back to the OS: otherwise every step
    page-faults its multi-MB activations back in, about 5% of a small CPU step. Linux/glibc only; a no-op
    elsewhere. Memory stays at the run's peak, which a training run reaches anyway."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum: buffers below 32 MB come from the heap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def pick_dtype(requested, device_type):
    """The autocast dtype a run really uses: CPU autocast is bfloat16 only, so float16 on a CPU runs (and is
    recorded) as float32."""
    if requested == "float16" and device_type == "cpu":
        return "float32"
    if requested != "auto":
        return requested
    return "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def autocast_context(device_type, dtype):
    """dtype as pick_dtype resolved it (which already turns float16 on a CPU into float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def peak_flops(device):
    """The device's own dense bf16 peak, or None where unknown (CPUs, unlisted GPUs)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


# ----------------------------------------------------------------------------------------------------
# data


def make_loader(cfg, split, device, rank=0, world_size=1):
    """The data source of a dataset: prepared token files (loader.py) or the Bigram-Backcopy generator."""
    if cfg["dataset"] == "bigram_backcopy":
        from sinkgpt.bigram_backcopy import BigramBackcopy
        try:
            return BigramBackcopy(split, cfg["batch_size"], cfg["block_size"], seed=cfg["seed"],
                                  n_triggers=cfg["bb_triggers"], device=device, rank=rank, world_size=world_size)
        except ValueError as e:  # a trigger count the corpus cannot supply
            raise ConfigError(f"config key 'bb_triggers': {e}") from None
    from sinkgpt.loader import TokenLoader, open_dataset
    data_dir = open_dataset(cfg["dataset"])
    try:
        return TokenLoader(data_dir, split, cfg["batch_size"], cfg["block_size"], seed=cfg["seed"],
                           prepend_bos=cfg["prepend_bos"], align_to_docs=cfg["align_to_docs"], device=device,
                           rank=rank, world_size=world_size)
    except ValueError as e:  # e.g. no window of block_size + 1 tokens in a small split
        raise ConfigError(str(e)) from None


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
    if not resuming and held:
        raise RunError(f"{out_dir} already holds a run ({held[0]}): continue it with --init_from=resume, or give "
                       f"another --out_dir (or delete that run)")


# ----------------------------------------------------------------------------------------------------
# model and optimizer


def load_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True) with one clear error for missing, truncated or corrupted files."""
    if not os.path.exists(path):
        raise RunError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RunError(f"checkpoint {path} is unreadable (truncated or corrupted?): {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None


def require_keys(checkpoint, keys, path):
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise RunError(f"{path} is not a sinkgpt checkpoint: missing {', '.join(missing)}")


def model_from_checkpoint(checkpoint, path="checkpoint"):
    require_keys(checkpoint, ("model", "model_args"), path)
    model = GPT(GPTConfig.from_dict(checkpoint["model_args"]))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing" in line
                      or "Unexpected" in line), str(e).splitlines()[0])
        raise RunError(f"{path} does not match its model config: {first}") from None
    return model


def build_model(cfg, vocab_size, bos_token, checkpoint=None):
    if checkpoint is not None:
        require_keys(checkpoint, ("model", "model_args", "optimizer", "iter_num", "best_val_loss", "tokens",
                                  "loader", "rng"), os.path.join(cfg["out_dir"], "ckpt.pt"))
        saved = checkpoint["model_args"]
        for key in MODEL_KEYS:
            if key in saved and saved[key] != cfg[key] and key != "dropout":
                raise RunError(f"config key '{key}'={cfg[key]!r} differs from the checkpoint's {saved[key]!r}; "
                               "resume with the checkpoint's model settings")
        if saved["vocab_size"] != vocab_size:
            raise RunError(f"checkpoint vocab_size {saved['vocab_size']} does not match dataset "
                           f"'{cfg['dataset']}' ({vocab_size})")
        return model_from_checkpoint(checkpoint, os.path.join(cfg["out_dir"], "ckpt.pt"))
    if cfg["init_from"] == "scratch":
        return GPT(model_config(cfg, vocab_size, bos_token))
    # a GPT-2 directory or hub name: its shape wins, our options (sinks, dropout, ...) are applied on top
    shape_keys = ("n_layer", "n_head", "n_embd", "block_size", "bias", "tie_embeddings")
    overrides = {k: cfg[k] for k in MODEL_KEYS if k not in shape_keys}
    try:
        model = GPT.from_pretrained(cfg["init_from"], **overrides)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise RunError(str(e)) from None
    if model.config.vocab_size != vocab_size:
        raise RunError(f"{cfg['init_from']} has vocab_size {model.config.vocab_size} but dataset "
                       f"'{cfg['dataset']}' has {vocab_size}; use a GPT-2 BPE dataset")
    if cfg["block_size"] < model.config.block_size:
        model.crop_block_size(cfg["block_size"])
    return model


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
# checkpoints and logs


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename over the target: a crash
    mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_events(path):
    """The events of a metrics.jsonl. A line that is not a whole JSON object (the last one, cut off by a kill or a
    full disk) is skipped."""
    events = []
    with open(path) as f:
        for line in f:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


class MetricsLog:
    """Appends one JSON object per event to out_dir/metrics.jsonl; a fresh run starts the file anew. With no
    path (eval_only) it writes nothing."""

    def __init__(self, path, resume_iter=None):
        self.path = path
        if path is None:
            return
        # resuming: keep the events up to the checkpoint we resume from (later ones are about to be redone)
        kept = [e for e in read_events(path) if e.get("iter", 0) <= resume_iter] if (
            resume_iter is not None and os.path.exists(path)) else []
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(path + ".tmp", path)

    def write(self, **event):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")


class StopSignal:
    """Ctrl-C / SIGTERM ask the loop to save a checkpoint and stop after the current iteration."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name


# ----------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, loaders, eval_iters, ctx, world_size):
    """Mean loss over eval_iters batches per split. Each loader restarts from its initial state, so every
    evaluation sees the same batches and val losses compare across iterations and runs."""
    model.eval()
    out = {}
    for split, (loader, start_state) in loaders.items():
        loader.load_state_dict(start_state)
        losses = torch.zeros(eval_iters)
        extra = {}
        for i in range(eval_iters):
            x, y = loader.next_batch()
            with ctx:
                logits, loss = model(x, y)
            losses[i] = loss.item()
            if split == "val" and hasattr(loader, "eval_metrics"):
                for key, value in loader.eval_metrics(logits, x, y).items():
                    extra[key] = extra.get(key, 0.0) + value / eval_iters
        mean = losses.mean()
        if world_size > 1:
            import torch.distributed as dist
            mean = mean.to(next(model.parameters()).device)
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        out[f"{split}_loss"] = mean.item()
        out.update({f"{split}_{k}": v for k, v in extra.items()})
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------
# the training loop


def train(cfg):
    rank, local_rank, world_size = setup_distributed(cfg)
    master = rank == 0
    device = pick_device(cfg["device"], local_rank)
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = pick_dtype(cfg["dtype"], device_type)
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device_type == "cpu":
        keep_freed_memory()
    if cfg["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be divisible "
                          f"by the number of processes ({world_size})")
    accum_steps = cfg["gradient_accumulation_steps"] // world_size
    torch.manual_seed(cfg["seed"])
    ctx = autocast_context(device_type, dtype)
    out_dir = cfg["out_dir"]

    prepare_out_dir(out_dir, cfg["init_from"] == "resume" or cfg["eval_only"])
    checkpoint = None
    if cfg["init_from"] == "resume":
        source = cfg["resume_from"] or out_dir
        checkpoint = load_checkpoint(os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source)
    train_loader = make_loader(cfg, "train", device, rank, world_size)
    eval_loaders = {split: make_loader(cfg, split, device, rank, world_size) for split in ("train", "val")}
    eval_loaders = {split: (loader, loader.state_dict()) for split, loader in eval_loaders.items()}
    model = build_model(cfg, train_loader.vocab_size, train_loader.bos_token, checkpoint)
    model.to(device)
    optimizer = build_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    iter_num, best_val_loss, tokens_seen = 0, float("inf"), 0
    if checkpoint is not None:
        if not cfg["reset_optimizer"]:  # reset_optimizer: fresh moments (also lets a resume switch optimizer)
            try:
                load_optimizer_state(optimizer, checkpoint["optimizer"])
            except ValueError as e:
                raise RunError(str(e)) from None
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        tokens_seen = checkpoint["tokens"]
        try:
            train_loader.load_state_dict(checkpoint["loader"])
        except (ValueError, KeyError) as e:
            raise RunError(f"the checkpoint's data position does not fit dataset '{cfg['dataset']}' ({e}): "
                           f"resume on the dataset it was trained on") from None
        set_rng_state(checkpoint["rng"])
    checkpoint = None  # free memory

    raw_model = model
    use_compile = cfg["compile"] if cfg["compile"] != "auto" else device_type == "cuda"
    if use_compile:
        model = torch.compile(model)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * accum_steps * world_size
    flops_per_iter = raw_model.flops_per_token(cfg["block_size"]) * tokens_per_iter
    peak = peak_flops(device)
    resumed_at = iter_num if cfg["init_from"] == "resume" else None
    log = None
    if master:
        if cfg["eval_only"]:  # a measurement: the run's folder (config, log, checkpoint) is left as it is
            log = MetricsLog(None)
        else:
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(dict(cfg, world_size=world_size, device_resolved=device, dtype_resolved=dtype), f,
                          indent=2)
            log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), resumed_at)
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_iter:,} tokens/iter, device {device}, "
              f"{dtype}, world size {world_size}" + (f", resuming at iter {iter_num}" if resumed_at is not None else ""))
        if hasattr(train_loader, "bayes_loss"):
            log.write(iter=iter_num, bayes_loss=train_loader.bayes_loss)
            print(f"Bayes-optimal loss of the process: {train_loader.bayes_loss:.4f}")

    tracker = None
    if cfg["track_interval"] > 0:
        from analyze import TrainingTracker
        tracker = TrainingTracker(raw_model, cfg, eval_loaders["val"][0])

    # interventions on the optimizer state (optim.py): built only when configured, free when off
    reset_at = as_iterations(cfg["reset_optimizer_at"])
    editor = opt_tracker = None
    try:
        if cfg["moment_edits"]:  # on every rank: the replicas' optimizer states stay identical
            editor = MomentEditor(raw_model, optimizer, cfg["moment_edits"])
        if cfg["track_params"] and tracker is not None and master:
            opt_tracker = OptimizerTracker(raw_model, optimizer, cfg["track_params"])
    except ValueError as e:
        raise RunError(str(e)) from None

    def checkpoint_state():
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_args": raw_model.config.to_dict(), "config": cfg, "iter_num": iter_num,
                "best_val_loss": best_val_loss, "tokens": tokens_seen, "rng": rng_state(),
                "loader": pending_loader_state, "meta": train_loader.meta}

    def kept_checkpoint():
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            return f"the last good checkpoint in {out_dir} is untouched"
        return "no checkpoint was written"

    def save_checkpoint(name="ckpt.pt"):
        save_atomic(checkpoint_state(), os.path.join(out_dir, name))

    if master and resumed_at is not None and resumed_at > cfg["max_iters"] and not cfg["eval_only"]:
        print(f"the checkpoint is at iter {resumed_at}, past max_iters={cfg['max_iters']}: nothing to train "
              f"(raise --max_iters to continue)")
    stop = StopSignal()
    pending_loader_state = train_loader.state_dict()  # the state that reproduces the prefetched batch
    x, y = train_loader.next_batch()
    t_last, iters_since_log = time.perf_counter(), 0
    while True:
        lr = lr_at(iter_num, cfg)
        set_lr(optimizer, lr, cfg)  # lr * each group's lr_mult; Muon groups follow muon_lr

        if (iter_num % cfg["eval_interval"] == 0 and iter_num != resumed_at or iter_num == cfg["max_iters"]
                or cfg["eval_only"]):
            losses = evaluate(model, eval_loaders, cfg["eval_iters"], ctx, world_size)
            if not math.isfinite(losses["val_loss"]):
                raise RunError(f"val loss is {losses['val_loss']} at iter {iter_num}; stopping, {kept_checkpoint()}")
            improved = losses["val_loss"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val_loss"])
            if master:
                print(f"step {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}")
                log.write(iter=iter_num, tokens=tokens_seen, lr=lr, best_val_loss=best_val_loss, **losses)
                if iter_num > 0 and (improved or cfg["always_save_checkpoint"]) and not cfg["eval_only"]:
                    save_checkpoint()
            t_last = time.perf_counter()  # evaluation time is not training time
        if iter_num >= cfg["max_iters"] or cfg["eval_only"]:  # >=: a checkpoint may be past a lowered max_iters
            break

        for micro_step in range(accum_steps):
            sync = micro_step == accum_steps - 1
            no_sync = model.no_sync() if world_size > 1 and not sync else contextlib.nullcontext()
            with no_sync:
                with ctx:
                    _, loss = model(x, y)
                    loss = loss / accum_steps
                pending_loader_state = train_loader.state_dict()
                x, y = train_loader.next_batch()  # prefetch while the device works
                scaler.scale(loss).backward()
        grad_norm = None
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
        track_opt = opt_tracker is not None and (iter_num + 1) % cfg["track_interval"] == 0
        if track_opt:
            opt_tracker.snapshot()  # the tracked parameters before the step: the update is the difference
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if editor is not None:
            editor.apply(iter_num)
        if reset_at and iter_num in reset_at:
            reset_optimizer_state(optimizer)
        tokens_seen += tokens_per_iter
        iters_since_log += 1

        if tracker is not None and iter_num % cfg["track_interval"] == 0 and master:
            record = tracker.measure()
            if track_opt:  # m and v as the next step will use them (after this iteration's edits)
                record.update(opt_tracker.measure())
            log.write(iter=iter_num, tokens=tokens_seen, **record)

        if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
            loss_value = loss.detach() * accum_steps  # the last micro-batch's loss: one host sync per log
            if world_size > 1:
                import torch.distributed as dist
                dist.all_reduce(loss_value, op=dist.ReduceOp.AVG)
            loss_value = loss_value.item()
            if not math.isfinite(loss_value):
                raise RunError(f"loss is {loss_value} at iter {iter_num}; stopping, {kept_checkpoint()}")
            if device_type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t_last
            ms_per_iter = 1000 * elapsed / iters_since_log
            tokens_per_s = tokens_per_iter * iters_since_log / elapsed
            mfu = flops_per_iter * iters_since_log / elapsed / peak if peak else None
            if master:
                mfu_text = f", mfu {100 * mfu:.1f}%" if mfu is not None else ""
                print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, {ms_per_iter:.1f} ms/iter, "
                      f"{tokens_per_s:,.0f} tok/s{mfu_text}")
                log.write(iter=iter_num, tokens=tokens_seen, lr=lr, train_loss=loss_value, ms_per_iter=ms_per_iter,
                          tokens_per_s=tokens_per_s, mfu=mfu,
                          grad_norm=None if grad_norm is None else grad_norm.item())
            t_last, iters_since_log = time.perf_counter(), 0

        if stop.received:
            if master:
                if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
                    raise RunError(f"{stop.received}: parameters are not finite, checkpoint not written")
                if cfg["always_save_checkpoint"]:
                    save_checkpoint()
                    print(f"{stop.received} at iter {iter_num}: checkpoint saved to {out_dir}/ckpt.pt")
                else:  # ckpt.pt keeps the best-val weights it promises; the stop state goes beside it
                    save_checkpoint("ckpt_stop.pt")
                    best = " (ckpt.pt keeps the best val loss)" if os.path.exists(
                        os.path.join(out_dir, "ckpt.pt")) else ""
                    print(f"{stop.received} at iter {iter_num}: checkpoint saved to {out_dir}/ckpt_stop.pt{best}; "
                          f"continue with --init_from=resume --resume_from={out_dir}/ckpt_stop.pt")
            return 130
    if master and tracker is not None:
        tracker.close()
    return 0


def main(argv):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # train() installs its own
    code = 1
    try:
        cfg = load_config(argv)
        code = train(cfg)
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except FileNotFoundError as e:  # missing prepared data: the message names the prepare command
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # before the loop's own handler is installed, or a second Ctrl-C: nothing to save
        print("interrupted", file=sys.stderr)
        code = 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if int(os.environ.get("RANK", -1)) != -1:
            import torch.distributed as dist
            if dist.is_initialized():
                if code == 0:  # let every rank finish (rank 0 may still be writing) before gloo's sockets close
                    dist.barrier()
                dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
