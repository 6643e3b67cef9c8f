"""
What a run leaves on disk and how it is read back: checkpoints (atomic save, load, the model inside), the
training progress they carry, metrics.jsonl (the log and its one reader), and the one way to load a model
with its tokenizer from a run folder, a checkpoint file or a pretrained folder.

    save_checkpoint(path, raw_model, optimizer, cfg, progress, meta, rng_states)   # temp file, fsync, rename
    ckpt = load_checkpoint(path)                                        # weights_only=True, one-line errors
    kept_checkpoints("out-bb/base")                                     # [(iter, path)] of keep_checkpoints
    target = load_model("out-bb/base", device)                          # model, tokenizer, config, bos rule
    events = read_metrics("out-bb/base")                                # a cut-off last line is skipped

May import: model, sinkgpt.common, sinkgpt.pretrained, sinkgpt.tokenizer.
"""

import json
import os
from dataclasses import dataclass, field

import torch

from model import GPT, GPTConfig
from sinkgpt.common import InputError, RunError, plain
from sinkgpt.pretrained import WEIGHT_FILES, PretrainedError, from_pretrained, resolve_folder
from sinkgpt.tokenizer import GPT2_VOCAB, describe_tokenizer, folder_tokenizer_meta, is_gpt2_bpe

# the keys every training checkpoint holds (load_checkpoint checks what a caller needs)
CHECKPOINT_KEYS = ("model", "model_args", "optimizer", "iter_num", "best_val_loss", "tokens", "loader", "rng")


# ----------------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class TrainProgress:
    """Where a run stands: what a checkpoint needs besides the weights and the optimizer. `loader` is the data
    loader's state that reproduces the next batch the loop will train on (the one already prefetched)."""
    iter_num: int = 0
    best_val_loss: float = float("inf")
    tokens: int = 0
    loader: dict = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(checkpoint["iter_num"], checkpoint["best_val_loss"], checkpoint["tokens"], checkpoint["loader"])


def rng_state(device):
    """This process's random state: the CPU generator's and, on a GPU, that device's (the only one it uses)."""
    state = {"torch": torch.get_rng_state()}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rank_rng_states(device, world_size):
    """Every process's rng_state, in rank order (a collective under DDP: every rank calls it): each rank draws
    its own dropout masks, so a bit-for-bit resume restores each rank's own state."""
    if world_size == 1:
        return [rng_state(device)]
    import torch.distributed as dist
    states = [None] * world_size
    dist.all_gather_object(states, rng_state(device))
    return states


def saved_rng_states(checkpoint):
    """The per-rank states of a checkpoint; one written before they were kept per rank holds the CPU state and
    a list with every visible GPU's state, of which a single process used the first."""
    rng = checkpoint["rng"]
    if "ranks" in rng:
        return rng["ranks"]
    state = {"torch": rng["torch"]}
    if rng.get("cuda"):
        state["cuda"] = rng["cuda"][0]
    return [state]


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename over the target: a crash
    mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, model, optimizer, cfg, progress, meta, rng_states, scaler=None):
    """Everything a bit-for-bit resume needs, as tensors and plain types (loads with weights_only=True):
    rng_states holds every rank's (rank_rng_states), `scaler` the float16 gradient scaler (its scale and growth
    tracker; without them a resumed run skips steps while the scale finds its level again)."""
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "model_args": model.config.to_dict(), "config": dict(cfg), "iter_num": progress.iter_num,
                 "best_val_loss": progress.best_val_loss, "tokens": progress.tokens, "rng": {"ranks": rng_states},
                 "scaler": scaler.state_dict() if scaler is not None else {}, "loader": progress.loader,
                 "meta": meta}, path)


def checkpoint_path(target):
    """A run folder means its ckpt.pt; a file is itself."""
    return os.path.join(target, "ckpt.pt") if os.path.isdir(target) else target


def kept_name(iter_num):
    """The file name of the checkpoint keep_checkpoints keeps at an iteration."""
    return f"ckpt_{iter_num}.pt"


def kept_checkpoints(run_dir):
    """The checkpoints a run kept (keep_checkpoints), as [(iteration, path)] in step order; [] for none."""
    kept = []
    for name in os.listdir(run_dir):
        number = name.removeprefix("ckpt_").removesuffix(".pt")
        if name.startswith("ckpt_") and name.endswith(".pt") and number.isdigit():
            kept.append((int(number), os.path.join(run_dir, name)))
    return sorted(kept)


def load_checkpoint(path, device="cpu", keys=("model", "model_args")):
    """torch.load(weights_only=True) with one clear error for missing, truncated, corrupted or foreign files."""
    if not os.path.exists(path):
        raise RunError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise RunError(f"checkpoint {path} is unreadable (truncated or corrupted?): {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise RunError(f"{path} is not a sinkgpt checkpoint: missing {', '.join(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    try:
        config = GPTConfig.from_dict(checkpoint["model_args"])
    except ValueError as e:  # a setting this model does not implement, or a combination it refuses
        raise RunError(f"{path}: {e}") from None
    model = GPT(config)
    state = dict(checkpoint["model"])
    for name, p in model.state_dict().items():  # gates of bias-free models saved before gates always had a bias:
        if name.endswith("c_gate.bias") and name not in state and name.replace("bias", "weight") in state:
            state[name] = torch.zeros_like(p)  # a zero bias is the same gate
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing" in line
                      or "Unexpected" in line), str(e).splitlines()[0])
        raise RunError(f"{path} does not match its model config: {first}") from None
    return model


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl


class MetricsError(InputError):
    """A metrics.jsonl that is missing or has a bad line before its last."""


def metrics_path(run):
    return os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run


def read_metrics(run):
    """The events (dicts) of a run's metrics.jsonl (a run folder or the file). The last line, when it is not
    whole JSON, was cut off by a kill or a full disk and is skipped; any other line that is not a JSON object is
    a MetricsError naming the file and the line."""
    path = metrics_path(run)
    if not os.path.isfile(path):
        raise MetricsError(f"{run}: no metrics.jsonl")
    with open(path) as f:
        lines = f.read().split("\n")
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the file's end, with no newline after it: a write cut off
                continue
            raise MetricsError(f"{path}:{number} is not JSON") from None
        if not isinstance(event, dict):
            raise MetricsError(f"{path}:{number} is not a JSON object")
        events.append(event)
    return events


class MetricsLog:
    """Appends one JSON object per event to out_dir/metrics.jsonl; a fresh run starts the file anew, a resumed
    one keeps the events up to the iteration it resumes from (later ones are about to be redone). With no path
    (eval_only) it writes nothing. `send` (live logging) also gets every event written."""

    def __init__(self, path, resume_iter=None, send=None):
        self.path, self.send = path, send
        self.kept = 0  # events kept from before (0: a new log, also for a run continued into a new folder)
        if path is None:
            return
        kept = [e for e in read_metrics(path) if e.get("iter", 0) <= resume_iter] if (
            resume_iter is not None and os.path.exists(path)) else []
        self.kept = len(kept)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in kept)
        os.replace(path + ".tmp", path)

    def write(self, **event):
        """One event; non-finite figures (an overflowing float16 step's gradient norm) are written as null, so
        the file stays strict JSON."""
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(plain(event), allow_nan=False) + "\n")
        if self.send is not None:
            self.send(event)


# ----------------------------------------------------------------------------------------------------
# a model and its tokenizer, for sampling and analysis


@dataclass
class LoadedModel:
    model: GPT  # in eval mode, on the device asked for
    meta: dict  # the tokenizer description (sinkgpt.tokenizer.load_tokenizer reads it)
    config: dict  # the training config ({} for a pretrained folder)
    kind: str  # 'checkpoint' or 'pretrained'
    bos: bool  # sequences start with the BOS token, as the model saw them in training
    step: int | None = None  # a checkpoint's training iteration (None for a pretrained folder)


def trained_with_bos(cfg):
    """The one BOS rule: a training run saw BOS at position 0 when it prepended it, when its windows started at
    document starts (which are BOS tokens), or on Bigram-Backcopy (every sequence starts with BOS)."""
    return bool(cfg.get("prepend_bos") or cfg.get("align_to_docs") or cfg.get("dataset") == "bigram_backcopy")


def is_pretrained_folder(path):
    """A Hugging Face folder: config.json beside the weights (a run folder has a config.json of its own)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES)


def looks_like_hub_name(target):
    """'gpt2' or 'openai-community/gpt2' (fetched when the hub is reachable), not a missing local path."""
    return not os.path.exists(target) and not target.startswith((".", "/", "~")) and not target.endswith(".pt") \
        and target.count("/") <= 1


def load_model(target, device="cpu", dtype=torch.float32, revision=None):
    """A model with its tokenizer from a run folder (its ckpt.pt), a checkpoint file, or a pretrained folder
    (config.json + weights; or a hub name, at `revision`), its weights in `dtype` on `device`. Pretrained models are
    documents-in-a-stream models: they start sequences with their BOS token. RunError / PretrainedError with
    one line for anything else."""
    run_checkpoint = os.path.join(target, "ckpt.pt")
    if os.path.isfile(target) or os.path.isfile(run_checkpoint):
        path = target if os.path.isfile(target) else run_checkpoint
        checkpoint = load_checkpoint(path)
        model = model_from_checkpoint(checkpoint, path)
        cfg = checkpoint.get("config") or {}
        meta = checkpoint.get("meta")
        if not meta:
            raise RunError(f"{path} carries no tokenizer description (meta)")
        loaded = LoadedModel(model, meta, cfg, "checkpoint", trained_with_bos(cfg), checkpoint.get("iter_num"))
    elif is_pretrained_folder(target) or looks_like_hub_name(target):
        folder = resolve_folder(target, revision)  # a hub name: the folder it was fetched into
        model = from_pretrained(folder, dtype, device)  # straight onto the device, in its dtype
        loaded = LoadedModel(model, pretrained_meta(folder, model), {}, "pretrained", True)
    elif os.path.isdir(target):
        raise RunError(f"{target} holds neither a run (ckpt.pt) nor a pretrained model (config.json and weights)")
    else:
        raise RunError(f"no checkpoint at {target}" if target.endswith(".pt") else f"{target} does not exist")
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def pretrained_meta(folder, model):
    """The tokenizer of a pretrained folder: a meta.json beside its config.json, else its tokenizer.json (through
    the tokenizers library), else GPT-2 BPE; one error line when the model's vocabulary cannot hold its ids."""
    meta_path = os.path.join(folder, "meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise PretrainedError(f"{meta_path} is not JSON ({e})") from None
    elif os.path.isfile(os.path.join(folder, "tokenizer.json")):
        try:
            meta = folder_tokenizer_meta(folder)
        except ValueError as e:
            raise PretrainedError(str(e)) from None
        if is_gpt2_bpe(meta):  # a full GPT-2 folder ships GPT-2's BPE as a tokenizer.json
            meta = {"tokenizer": "gpt2", "bos_token": model.config.bos_token, "vocab_size": GPT2_VOCAB}
    else:
        meta = {"tokenizer": "gpt2", "bos_token": model.config.bos_token, "vocab_size": GPT2_VOCAB}
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise PretrainedError(f"{folder}: the model's vocabulary ({model.config.vocab_size} tokens) is smaller than "
                              f"its tokenizer's ({describe_tokenizer(meta)}, {meta['vocab_size']} tokens): give the "
                              "folder its own tokenizer.json")
    return meta
