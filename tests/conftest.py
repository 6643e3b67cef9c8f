"""Shared fixtures: tiny prepared char datasets, a tiny random Hugging Face GPT-2 folder, in-process runs of
train.py / sample.py, and the `slow` marker (pytest.ini deselects it by default; run with -m slow)."""
import json
import os
import signal
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from sinkgpt import prep  # noqa: E402

HAMLET = os.path.join(REPO, "data", "shakespeare", "corpus", "hamlet_gut.txt")

# a tiny char model: 2 layers, width 32, context 32; a few ms per iteration on a CPU
TINY_TRAIN_FLAGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=4,
                        eval_interval=10, log_interval=1, warmup_iters=0, learning_rate=3e-3, min_lr=3e-4,
                        dropout=0.0, device="cpu", dtype="float32", compile=False, grad_clip=1.0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; run with -m slow")
    # one intra-op thread: the models here are tiny, and on a shared 2-core machine a second spinning OpenMP
    # thread makes runs several times slower (measured 3 s vs 16 s for a 60-iteration run under load)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # no network: the GPT-2 tokenizer comes from the bundled ranks, at once
    monkeypatch.setenv("SINKGPT_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """train.py installs SIGINT/SIGTERM handlers and leaves them in place; keep pytest's own."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def shakespeare_excerpt(n_chars=24000):
    """A line-aligned slice of Hamlet from the bundled corpus (real text, so a small model learns fast)."""
    with open(HAMLET, encoding="utf-8") as f:
        text = f.read()
    start = text.index("ACT I.")
    cut = text.rfind("\n", start, start + n_chars)
    return text[start:cut + 1]


def make_char_dataset(folder, texts):
    """Prepare .txt documents as a char-level dataset in folder/prepared (prep.py's format)."""
    src = os.path.join(folder, "src")
    os.makedirs(src, exist_ok=True)
    for i, text in enumerate(texts):
        with open(os.path.join(src, f"doc_{i:02d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
    out = os.path.join(folder, "prepared")
    prep.prepare_text_dataset([src], out, "char", val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory):
    """Absolute path of a prepared char dataset (three chunks of Hamlet, ~24k characters)."""
    text = shakespeare_excerpt()
    third = len(text) // 3
    cuts = [0, text.index("\n", third) + 1, text.index("\n", 2 * third) + 1, len(text)]
    docs = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    return make_char_dataset(str(tmp_path_factory.mktemp("char_data")), docs)


@pytest.fixture(scope="session")
def other_char_dataset(tmp_path_factory):
    """A char dataset with a different (smaller) vocabulary than char_dataset."""
    text = "".join(f"abc cab {'ab' * (i % 7)} bca\n" for i in range(1500))
    return make_char_dataset(str(tmp_path_factory.mktemp("other_data")), [text[:20000], text[20000:]])


def flags(**overrides):
    """--key=value flags for train.py: the tiny settings, then the overrides."""
    merged = dict(TINY_TRAIN_FLAGS, **overrides)
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in merged.items()]


def run_train(out_dir, dataset, **overrides):
    """train.main in this process; returns its exit code."""
    import train
    return train.main(flags(out_dir=str(out_dir), dataset=str(dataset), **overrides))


def read_metrics(out_dir):
    from sinkgpt.checkpoint import read_metrics as read
    return read(out_dir)


def train_losses(out_dir):
    """{iter: train_loss} of the per-iteration log events."""
    return {e["iter"]: e["train_loss"] for e in read_metrics(out_dir) if "ms_per_iter" in e}


def val_losses(out_dir):
    """[(iter, val_loss)] of the evaluation events, in order."""
    return [(e["iter"], e["val_loss"]) for e in read_metrics(out_dir) if "val_loss" in e]


# ------------------------------------------------------------------------------------------------
# a tiny random GPT-2 in Hugging Face format

HF_VOCAB = 100
HF_BOS = HF_VOCAB - 1


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config
    kwargs = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=HF_VOCAB, n_positions=32, bos_token_id=HF_BOS,
                  eos_token_id=HF_BOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def random_gpt2(seed=0, **overrides):
    """A GPT2LMHeadModel with every weight random (biases and norm parameters too, so a wrong mapping shows)."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_gpt2():
    return random_gpt2()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, hf_gpt2):
    """The tiny GPT-2 saved with save_pretrained (config.json + model.safetensors)."""
    path = str(tmp_path_factory.mktemp("hf_gpt2"))
    hf_gpt2.save_pretrained(path)
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    return path


# ------------------------------------------------------------------------------------------------
# tiny random models of our own


def tiny(seed=0, **options):
    """A 2-layer, width-32 GPT with the given options (vocabulary 37, BOS 36, context 16)."""
    from model import GPT, GPTConfig
    kwargs = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=37, bos_token=36)
    kwargs.update(options)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**kwargs))


def randomize(model, seed=0, scale=0.3):
    """Non-trivial weights everywhere (biases, norms and sink parameters included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if name.endswith("weight") and ("ln_" in name or "_norm" in name):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(scale * noise)
    return model


def idx_batch(model, B=2, T=12, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# a tiny pretrained Llama-family folder with a tokenizer.json of its own (both built offline)

LLAMA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (BOS = 1, EOS = 2, as SmolLM2)


def train_byte_level_tokenizer(vocab_size=320):
    """A byte-level BPE tokenizer.json (the kind GPT-2, SmolLM2 and Llama-3 use) trained on Hamlet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([shakespeare_excerpt(24000)], trainer)
    return tokenizer


def make_llama_folder(folder, seed=0, **overrides):
    """A random LlamaForCausalLM (3 layers, 6 query / 2 key-value heads, width 48) saved with its tokenizer.json,
    a tokenizer_config.json and BOS/EOS ids in config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = train_byte_level_tokenizer()
    kwargs = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, rope_theta=100000.0,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    tokenizer.save(os.path.join(str(folder), "tokenizer.json"))
    with open(os.path.join(str(folder), "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                   "eos_token": "<|im_end|>", "clean_up_tokenization_spaces": False}, f)
    return str(folder), model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """(folder, the transformers model) of the tiny Llama with its own tokenizer."""
    return make_llama_folder(tmp_path_factory.mktemp("llama") / "tiny_llama")


@pytest.fixture(scope="session")
def llama_data(tmp_path_factory, llama_dir):
    """A prepared dataset (4 Shakespeare documents) in the tiny Llama's own tokenizer."""
    from sinkgpt.tokenizer import folder_tokenizer_meta
    folder, _ = llama_dir
    out = tmp_path_factory.mktemp("llama_data") / "prepared"
    src = tmp_path_factory.mktemp("llama_src")
    text = shakespeare_excerpt(24000)
    for i in range(4):
        (src / f"doc{i}.txt").write_text(text[i * 6000:(i + 1) * 6000])
    prep.prepare_text_dataset([str(src)], str(out), folder_tokenizer_meta(folder), val_fraction=0.25)
    return str(out)


# ------------------------------------------------------------------------------------------------
# the pretrained families' tests (Llama, Mistral, Qwen2, GPT-NeoX): a transformers model saved and compared


def save(model, folder):
    """save_pretrained into folder; returns its path as a string."""
    model.save_pretrained(str(folder))
    return str(folder)


def randomize_hf(model, is_gain):
    """Every weight of a transformers model random, the norm gains (is_gain(name)) around 1: a wrong mapping shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if is_gain(name) else 0.15 * torch.randn_like(p))
    return model.eval()


def random_tokens(vocab_size, B=2, T=20, seed=0):
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


def assert_greedy_equals_transformers(model, hf, prompt, new_tokens=25):
    """Our greedy decoding with the KV cache gives transformers' generate tokens (all of them: no stop on EOS)."""
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, new_tokens, temperature=0), theirs)
