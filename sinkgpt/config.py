"""
Configuration: every key train.py knows, with its default, and the loader of config files and --key=value flags.

    python train.py config/train_shakespeare_char.py --batch_size=32 --sink=logit

A config file is plain Python assignments (nanoGPT's format). Keys keep nanoGPT's names wherever nanoGPT has one.
An unknown key or a value of the wrong type stops with one line that names it (and the closest known key).

May import: model, sinkgpt.common, sinkgpt.optim.
"""

import ast
import difflib
import os
from dataclasses import fields

from model import CHOICES as MODEL_CHOICES
from model import GPTConfig
from sinkgpt.common import InputError
from sinkgpt.optim import OPTIM_DEFAULTS, OPTIMIZERS, check_optim_config


class ConfigError(InputError):
    """A mistake in a config file or flag; the entry points print it as one line and exit."""


# the families of keys (docs/reference.md documents each); model keys are GPTConfig's fields
DEFAULTS = dict(
    # I/O and logging
    out_dir="out",
    eval_interval=250,
    log_interval=10,
    eval_iters=50,
    eval_only=False,
    always_save_checkpoint=True,  # False: write a checkpoint only when val loss improves
    keep_checkpoints=0,  # 0 = off; else also keep ckpt_<iter>.pt every N iterations (step 0 too), for trajectories
    init_from="scratch",  # 'scratch' | 'resume' | a pretrained folder (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX) or hub name
    resume_from="",  # init_from='resume': a run folder or checkpoint to continue from ('' = out_dir itself)
    seed=1337,
    track_interval=0,  # 0 = off; else log massive-activation / sink statistics every N iterations
    wandb_log=False,  # also send every metrics.jsonl event to Weights & Biases (pip install wandb)
    wandb_project="sinkgpt",
    wandb_run_name="",  # '' = the out_dir's folder name
    # data
    dataset="shakespeare_char",
    gradient_accumulation_steps=1,
    batch_size=12,
    prepend_bos=False,  # every training window starts with the BOS / end-of-text token
    bos_loss=True,  # prepend_bos: the prediction made at BOS counts in the loss (False: only what a model
    # without BOS predicts too, the comparison with a model whose BOS is a slot)
    align_to_docs=False,  # windows start at document boundaries
    bb_triggers=3,  # dataset='bigram_backcopy': number of trigger characters
    # optimizer and schedule
    optimizer="adamw",  # 'adamw' | 'sgd' | 'muon' (Muon for hidden matrices, AdamW for the rest; optim.py)
    learning_rate=6e-4,
    max_iters=600000,
    weight_decay=1e-1,
    beta1=0.9,
    beta2=0.95,
    eps=1e-8,
    momentum=0.9,  # optimizer='sgd'
    grad_clip=1.0,  # 0 = off
    decay_lr=True,
    warmup_iters=2000,
    lr_decay_iters=0,  # 0 = max_iters
    min_lr=6e-5,
    # system
    device="auto",  # 'auto' picks cuda, then mps, then cpu
    dtype="auto",  # 'auto': bfloat16 autocast on CUDA, float32 elsewhere; or 'float32' | 'bfloat16' | 'float16'
    compile="auto",  # torch.compile: True | False | 'auto' (on for CUDA)
    backend="nccl",  # DDP backend on CUDA (gloo is used on CPU)
    ddp_timeout=600,  # seconds a rank waits for the others before the job stops
)
DEFAULTS.update(OPTIM_DEFAULTS)  # lr multipliers, per-group weight decay, Muon, optimizer-state interventions
MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name not in ("vocab_size", "bos_token")]
for _field in fields(GPTConfig):
    if _field.name in MODEL_KEYS:
        DEFAULTS[_field.name] = _field.default

# the one table of the keys that take one of a few values: the model's options, the optimizer, the precision
CHOICES = dict(MODEL_CHOICES, optimizer=OPTIMIZERS, dtype=("auto", "float32", "bfloat16", "float16"))
# keys that take more than one type
EXTRA_TYPES = {"compile": (bool, str), "reset_optimizer_at": (list, int), "attn_window": (int, list)}


def check_value(key, value, source, known=DEFAULTS):
    """Return value converted to the key's type (the type of its default in `known`), or raise ConfigError
    naming the key."""
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}")
    default = known[key]
    allowed = EXTRA_TYPES.get(key, (type(default),))
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool)):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"config key '{key}' in {source} must be {names}, got {value!r} ({type(value).__name__})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' in {source} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key == "compile" and isinstance(value, str) and value != "auto":
        raise ConfigError(f"config key 'compile' in {source} must be True, False or 'auto', got {value!r}")
    return value


def read_config_file(path):
    """Run a config file and return its assignments (names starting with '_' and imported modules are skipped).
    A config may start from another with include("relative/path.py"), resolved next to the including file."""
    namespace = {}

    def run(file):
        if not os.path.isfile(file):
            raise ConfigError(f"config file {file} does not exist")
        with open(file) as f:
            code = compile(f.read(), file, "exec")
        outer_include = namespace.get("include")  # restored after, so a nested include resolves from its own folder
        namespace["include"] = lambda rel: run(os.path.normpath(os.path.join(os.path.dirname(file), rel)))
        try:
            exec(code, namespace)
        finally:
            if outer_include is None:
                del namespace["include"]
            else:
                namespace["include"] = outer_include

    try:
        run(path)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def parse_flag_value(text, key, known=DEFAULTS):
    """--key=value: Python literals (numbers, True/False, quoted strings); anything else is a string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(known.get(key), str) and not isinstance(value, str) and key not in EXTRA_TYPES:
        return text  # --out_dir=123 means the string '123'
    return value


class Config(dict):
    """A resolved config: a dict of every key, plus `explicit`, the keys that a config file or flag names. A resume
    or a pretrained start honours or refuses those even where they equal their default."""
    explicit = frozenset()


def given(config, key):
    """Whether the run asks for this key: named by a config file or flag (a Config), or off its default (a dict
    built in code)."""
    if isinstance(config, Config):
        return key in config.explicit
    return config[key] != DEFAULTS[key]


def load_config(argv, script_keys=None):
    """Defaults, then config files in order, then --key=value flags (in order). Returns a Config (a dict that
    also knows which keys were named). script_keys (name -> default) are a script's own flags (bench.py's),
    parsed and type-checked like config keys and returned with them; a bare --key sets a True/False key to
    True."""
    known = dict(DEFAULTS, **(script_keys or {}))
    config = Config(known)
    named = set()
    for path in [arg for arg in argv if not arg.startswith("--")]:
        for key, value in read_config_file(path).items():
            config[key] = check_value(key, value, path, known)
            named.add(key)
    for flag in [arg for arg in argv if arg.startswith("--")]:  # flags win over files, wherever they stand
        key, sep, text = flag[2:].partition("=")
        if not sep and isinstance(known.get(key), bool):
            sep, text = "=", "True"
        if not sep:
            raise ConfigError(f"flag {flag} needs a value: --{key}=VALUE")
        config[key] = check_value(key, parse_flag_value(text, key, known), f"flag {flag}", known)
        named.add(key)
    config.explicit = frozenset(named)
    check_ranges(config)
    return config


def check_ranges(config):
    positive = ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "gradient_accumulation_steps",
                "eval_iters", "log_interval", "eval_interval", "ddp_timeout")
    for key in positive:
        if config[key] <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {config[key]}")
    for key in ("max_iters", "keep_checkpoints", "warmup_iters", "lr_decay_iters", "track_interval", "learning_rate",
                "min_lr", "weight_decay", "grad_clip", "momentum"):
        if config[key] < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {config[key]}")
    if not 0 <= config["seed"] < 2**63:
        raise ConfigError(f"config key 'seed' must be in [0, 2**63), got {config['seed']}")
    if config["resume_from"] and config["init_from"] != "resume":
        raise ConfigError(f"config key 'resume_from' needs init_from='resume' (init_from is {config['init_from']!r})")
    if not 0 <= config["dropout"] < 1:
        raise ConfigError(f"config key 'dropout' must be in [0, 1), got {config['dropout']}")
    try:
        model_config(config, vocab_size=1, bos_token=0)
        check_optim_config(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_config(config, vocab_size, bos_token):
    """The GPTConfig for a resolved training config and a dataset's vocabulary."""
    return GPTConfig(vocab_size=vocab_size, bos_token=bos_token, **{k: config[k] for k in MODEL_KEYS})
