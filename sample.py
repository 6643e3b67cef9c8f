"""
Sample from a trained checkpoint or from a pretrained folder (GPT-2, Llama, Mistral, Qwen2 or GPT-NeoX family).

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --init_from=path/to/gpt2 --start=FILE:prompt.txt --temperature=0.8 --top_p=0.95

A pretrained folder's prompt is tokenised as transformers tokenises it for that folder (BOS in front only where
the folder's tokenizer adds it), so greedy output equals transformers' generate; a training run's prompt starts
with BOS when the run saw BOS at position 0. --bos=true|false forces either. The same --seed gives the same
text. Bad input (unknown characters, an empty prompt, a missing or corrupted
checkpoint) stops with one line; a prompt longer than the context is cropped with a warning.
"""

import argparse
import os
import sys

import torch

from sinkgpt.checkpoint import load_model
from sinkgpt.common import InputError, RunError
from sinkgpt.config import CHOICES
from sinkgpt.generation import decode_layout
from sinkgpt.runtime import pick_device, pick_dtype
from sinkgpt.tokenizer import load_tokenizer, read_text_argument


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="out", help="a training run's folder (reads out_dir/ckpt.pt)")
    parser.add_argument("--init_from", default="resume", help="'resume' (use --out_dir) or a pretrained folder/name")
    parser.add_argument("--start", default=None, help="prompt text, or FILE:path; default: the BOS token alone")
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=200, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="the weights' dtype (auto: bfloat16 on a GPU that runs it "
                                                        "natively, float16 on an older GPU, float32 on a CPU or "
                                                        "MPS); float16 on a CPU runs as float32")
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context every token")
    parser.add_argument("--bos", type=str.lower, choices=("auto", "true", "false"), default="auto",
                        help="start the prompt with BOS; auto: as a pretrained folder's tokenizer does, or as the "
                             "training run saw text")
    return parser.parse_args(argv)


def prompt_starts_with_bos(flag, target, tokenizer):
    """--bos, else transformers' convention for a pretrained folder (BOS only where its tokenizer adds it), else
    the training run's BOS rule."""
    if flag != "auto":
        return flag == "true"
    if target.kind == "pretrained":
        return getattr(tokenizer, "adds_bos", False)
    return target.bos


def read_prompt(start):
    """The --start text (FILE:path reads a file); None when there is none."""
    if start is None:
        return None
    try:
        return read_text_argument(start, "prompt")
    except ValueError as e:
        hint = "; give --start=TEXT, or leave --start out to begin from the BOS token" if "empty" in str(e) else ""
        raise RunError(f"{e}{hint}") from None


def encode_prompt(tokenizer, text, prepend_bos, block_size):
    """Token ids of the prompt (BOS alone when there is none), cropped to the last block_size - 1 tokens."""
    if text is None:
        ids = [tokenizer.bos_token]
    else:
        try:
            ids = tokenizer.encode(text)
        except ValueError as e:  # characters outside a char-level vocabulary
            raise RunError(str(e)) from None
        if prepend_bos:
            ids = [tokenizer.bos_token] + ids
    if len(ids) >= block_size:
        print(f"warning: the prompt has {len(ids)} tokens; keeping the last {block_size - 1} "
              f"(block_size {block_size})", file=sys.stderr)
        ids = ids[-(block_size - 1):]
    return ids


def check_args(args):
    """Values argparse's types let through but generate() cannot use: one RunError naming the flag."""
    checks = [(args.num_samples >= 1, "--num_samples must be >= 1"),
              (args.max_new_tokens >= 0, "--max_new_tokens must be >= 0"),
              (args.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
              (args.top_k >= 0, "--top_k must be >= 0 (0 = off)"),
              (0 < args.top_p <= 1, "--top_p must be in (0, 1] (1 = off)"),
              (args.dtype in CHOICES["dtype"], f"--dtype must be one of {', '.join(CHOICES['dtype'])}")]
    for ok, message in checks:
        if not ok:
            raise RunError(message)


def sample(args):
    check_args(args)
    device = pick_device(args.device)
    device_type = device.split(":")[0]
    dtype = getattr(torch, pick_dtype(args.dtype, device_type))  # the weights', loaded straight in it on the device
    path = os.path.join(args.out_dir, "ckpt.pt") if args.init_from == "resume" else args.init_from
    target = load_model(path, device, dtype)
    model, tokenizer = target.model, load_tokenizer(target.meta)
    if model.config.pos_offset and args.start is None:  # BOS is its slot: a BOS token would stand at position 1
        raise RunError("this model's BOS is a key/value slot (convert.py): give a prompt with --start")
    ids = encode_prompt(tokenizer, read_prompt(args.start), prompt_starts_with_bos(args.bos, target, tokenizer),
                        model.config.block_size)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    texts = []
    for _ in range(args.num_samples):
        with decode_layout(model):
            y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                               top_p=args.top_p, generator=generator, use_cache=not args.no_cache)
        texts.append(tokenizer.decode(y[0].tolist()))
    return texts


def main(argv):
    args = parse_args(argv)
    try:
        for text in sample(args):
            print(text)
            print("---------------")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
