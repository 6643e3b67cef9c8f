"""
transformers' own model of a pretrained folder beside ours (bench.py --vs_transformers): the model as a
transformers user loads it, wrapped to take a training step as ours does, its greedy generate, and each
implementation's peak memory measured in a fresh process of its own. The measurements are in
docs/performance.md.

May import: sinkgpt.common.
"""

import multiprocessing
import resource

import torch

from sinkgpt.common import RunError


def transformers_model(folder, device="cpu"):
    """transformers' own model of a folder, as a transformers user loads it (SDPA attention, float32)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).to(device)


class TransformersModel(torch.nn.Module):
    """transformers' model of a folder as train_step calls a model: model(x, y) -> (logits, loss), the loss as a
    transformers user computes it (labels = the input ids; transformers shifts them)."""

    def __init__(self, folder):
        super().__init__()
        self.hf = transformers_model(folder)
        self.config = self.hf.config

    def forward(self, x, y=None):
        out = self.hf(input_ids=x, labels=x if y is not None else None)
        return out.logits, out.loss

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def transformers_optimizer(model, cfg):
    """Fused AdamW with the run's settings on every parameter, as ours steps."""
    return torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             eps=cfg["eps"], weight_decay=cfg["weight_decay"], fused=True)


class TransformersGenerator:
    """transformers' greedy generate with its KV cache, for all n_new tokens (no stop on EOS)."""
    name = "transformers"

    def __init__(self, folder, device):
        self.model = transformers_model(folder, device).eval()
        self.model.generation_config.eos_token_id = None

    def __call__(self, prompt, n_new):
        return self.model.generate(prompt, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                   attention_mask=torch.ones_like(prompt))


def peak_rss_in_own_process(run, args, which):
    """Peak RSS (MB) of a fresh process that calls run(*args) (a picklable top-level function): on a CPU a
    process's peak is the only memory figure, so each implementation gets a process of its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_and_report_peak, args=(run, args, queue))
    process.start()
    process.join()
    if process.exitcode != 0 or queue.empty():
        raise RunError(f"measuring the peak memory of {which} in a process of its own failed (exit code "
                       f"{process.exitcode})" + (f": {queue.get()[1]}" if not queue.empty() else ""))
    status, value = queue.get()
    if status != "ok":
        raise RunError(f"measuring the peak memory of {which} in a process of its own failed: {value}")
    return value


def _run_and_report_peak(run, args, queue):
    try:
        run(*args)
        queue.put(("ok", own_peak_rss_mb()))
    except Exception as e:  # the parent reports it in one line
        queue.put(("error", f"{type(e).__name__}: {e}"))


def own_peak_rss_mb():
    """This process's own peak RSS: VmHWM of its address space. (ru_maxrss would not do in a spawned child: Linux
    carries the forking parent's high-water mark across fork + exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
