"""
Make a model's emergent sink explicit: its BOS at position 0 becomes a key/value slot in every layer
(model.bos_as_slot), written as a run folder that every script takes.

    python convert.py data/models/SmolLM2-135M-Instruct --out_dir out-explicit/smollm2
    python convert.py gpt2 --out_dir out-explicit/gpt2              # a hub name, where the hub is reachable
    python convert.py out-bb/base --out_dir out-explicit/bb          # a run trained with BOS first

BOS at position 0 sees only itself, so its key and value in every layer are constants of the model: the
converted model (sink='kv_bias', real tokens from position 1) computes on the real tokens what the original
computes with BOS first, and never computes BOS's residual stream, where the massive activation lives. The
command checks that on text windows and prints the largest logit difference; it writes out_dir/ckpt.pt (model,
config, tokenizer) and out_dir/convert.json (the check). Then:

    python sample.py --init_from=out-explicit/smollm2 --start="Once upon a time"
    python analyze.py out-explicit/smollm2 --report reports/explicit
    python analyze.py explicit data/models/SmolLM2-135M-Instruct out-explicit/smollm2 --report R
    python train.py config/continue/smollm2.py --init_from=out-explicit/smollm2 --prepend_bos=False

--remove_neurons 11:1229,11:1487 also zeroes those MLP neurons (their input rows and output column): the
writers of the massive activation, which the converted model no longer needs. Bad input is one error line.
"""

import argparse
import json
import os
import sys
import time

import torch

from model import bos_as_slot
from sinkgpt.checkpoint import load_model, save_atomic
from sinkgpt.common import REPO_ROOT, InputError, RunError, plain
from sinkgpt.explicit import parse_neurons
from sinkgpt.tokenizer import load_tokenizer

VERIFY_TEXT = os.path.join(REPO_ROOT, "data", "shakespeare", "corpus", "hamlet_gut.txt")
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-10}  # largest |logit difference| allowed


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise RunError(message)


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a pretrained folder or hub name, a run folder (ckpt.pt) or a checkpoint file")
    p.add_argument("--out_dir", required=True, help="the folder to write (must not hold a run)")
    p.add_argument("--remove_neurons", default="", help="LAYER:NEURON,... MLP neurons to zero in the converted model")
    p.add_argument("--windows", type=int, default=8, help="text windows the check runs on")
    p.add_argument("--window_tokens", type=int, default=128)
    return p.parse_args(argv)


@torch.no_grad()
def remove_neurons(model, neurons):
    """Zero MLP neurons: their rows of c_fc (swiglu: the gate row and the up row) and bias, their c_proj column."""
    hidden = model.config.hidden_size
    for layer, neuron in neurons:
        mlp = model.transformer.h[layer].mlp
        rows = [neuron, hidden + neuron] if model.config.mlp_act == "swiglu" else [neuron]
        mlp.c_fc.weight[rows] = 0.0
        if mlp.c_fc.bias is not None:
            mlp.c_fc.bias[rows] = 0.0
        mlp.c_proj.weight[:, neuron] = 0.0


def check_windows(meta, model, n, length, seed=1337):
    """(n, length) real-token windows of the bundled Hamlet in the model's tokenizer; seeded random ids where
    the tokenizer cannot encode it (a character vocabulary of other text)."""
    length = min(length, model.config.block_size - 1)
    try:
        with open(VERIFY_TEXT, encoding="utf-8") as f:
            ids = load_tokenizer(meta).encode(f.read()[:200_000])
    except (OSError, ValueError):
        ids = []
    generator = torch.Generator().manual_seed(seed)
    if len(ids) < n * length:
        return torch.randint(0, model.config.vocab_size, (n, length), generator=generator)
    starts = torch.randint(0, len(ids) - length, (n,), generator=generator).tolist()
    return torch.tensor([ids[s:s + length] for s in starts])


@torch.no_grad()
def verify(original, converted, windows, bos_token):
    """Logits of the converted model on the windows against the original's with BOS first."""
    device = original.lm_head.weight.device
    x = windows.to(device)
    with_bos = torch.cat([torch.full_like(x[:, :1], bos_token), x], dim=1)
    ours, _ = converted(x)
    reference, _ = original(with_bos)
    reference = reference[:, 1:]
    return {"windows": list(x.shape), "max_abs_logit_diff": (ours - reference).abs().max().item(),
            "max_abs_logit": reference.abs().max().item(), "dtype": str(ours.dtype).replace("torch.", "")}


def convert(args):
    if os.path.exists(os.path.join(args.out_dir, "ckpt.pt")):
        raise RunError(f"{args.out_dir} already holds a run (ckpt.pt): give another --out_dir (or delete it)")
    if args.windows < 1 or args.window_tokens < 1:
        raise RunError("--windows and --window_tokens must be >= 1")
    t0 = time.perf_counter()
    target = load_model(args.target)
    original, meta = target.model, target.meta
    try:
        converted = bos_as_slot(original).eval()
    except ValueError as e:
        raise RunError(f"{args.target}: {e}") from None
    if meta.get("bos_token") is None or not target.bos:
        raise RunError(f"{args.target} was not trained with a BOS token at position 0: there is no BOS sink to "
                       "convert")
    try:
        neurons = parse_neurons(args.remove_neurons, original.config, "--remove_neurons")
    except ValueError as e:
        raise RunError(str(e)) from None
    windows = check_windows(meta, original, args.windows, args.window_tokens)
    check = verify(original, converted, windows, meta["bos_token"])
    tolerance = VERIFY_TOLERANCE.get(original.lm_head.weight.dtype, 1e-2)
    if not check["max_abs_logit_diff"] <= tolerance:
        raise RunError(f"the converted model's logits differ from the original's by {check['max_abs_logit_diff']:.3g} "
                       f"(allowed {tolerance:g}): not written")
    remove_neurons(converted, neurons)
    source_dataset = target.config.get("dataset")
    config = {"converted_from": args.target, "remove_neurons": args.remove_neurons, "prepend_bos": False,
              **({"dataset": source_dataset} if source_dataset else {})}
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out_dir {args.out_dir!r} cannot be created: {e.strerror}") from None
    save_atomic({"model": converted.state_dict(), "model_args": converted.config.to_dict(), "config": config,
                 "meta": meta}, os.path.join(args.out_dir, "ckpt.pt"))
    seconds = time.perf_counter() - t0
    report = {"source": args.target, "out_dir": args.out_dir, "removed_neurons": neurons, "check": check,
              "seconds": seconds}
    with open(os.path.join(args.out_dir, "convert.json"), "w") as f:
        json.dump(plain(report), f, indent=1)
    return report


def main(argv):
    try:
        report = convert(parse_args(argv))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    check = report["check"]
    print(f"wrote {report['out_dir']}/ckpt.pt in {report['seconds']:.0f} s: on {check['windows'][0]} windows of "
          f"{check['windows'][1]} tokens the converted logits equal the original's (BOS first) within "
          f"{check['max_abs_logit_diff']:.2g} ({check['dtype']}; max |logit| {check['max_abs_logit']:.3g})"
          + (f"; removed neurons {report['removed_neurons']}" if report["removed_neurons"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
