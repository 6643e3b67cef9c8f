"""Watch an attention sink form on Bigram-Backcopy (Guo et al. 2024), and a dedicated slot take it over.

The base config (config/bb/base.py) at width 64 forms a dormant BOS sink in layer 0 within a few hundred
Adam steps; with a learned sink logit or k/v bias, a later layer moves its dormant mass onto the slot
(docs/sinks.md, "Measured on a 2-core x86 CPU"). Seeds are fixed; the assertions are on the phenomenon, with margins.
"""
import pytest
import torch

import train
from conftest import REPO
from sinkgpt.bigram_backcopy import BigramBackcopy
from sinkgpt.checkpoint import load_model, read_metrics
from sinkgpt.measure import collect


def train_bb(tmp_path, name, iters, *flags):
    out_dir = str(tmp_path / name)
    code = train.main(["config/bb/base.py", "--n_embd=64", f"--max_iters={iters}", "--eval_interval=100000",
                       "--log_interval=100", "--track_interval=0", "--eval_iters=5", f"--out_dir={out_dir}",
                       "--device=cpu", "--dtype=float32", "--compile=False", *flags])  # the CPU's figures anywhere
    assert code == 0
    return out_dir


def bb_layers(out_dir):
    """Per layer: attention on BOS from non-trigger (dormant) and trigger (active) queries, on the slot, on
    fresh validation sequences."""
    model = load_model(out_dir, "cpu").model
    loader = BigramBackcopy("val", 32, 64, seed=4242)
    batches = [loader.next_batch() for _ in range(4)]
    with torch.no_grad():
        stats = collect(model, batches, [loader.trigger_mask(x) for x, _ in batches])
    return [layer["bb"] for layer in stats["layers"]], stats


def final_backcopy_loss(out_dir):
    evals = [e for e in read_metrics(out_dir) if "val_backcopy_loss" in e]
    return evals[-1]["val_backcopy_loss"], evals[-1]["val_loss"]


@pytest.mark.slow
def test_bigram_backcopy_grows_a_dormant_bos_sink(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out_dir = train_bb(tmp_path, "base", 600)
    layers, stats = bb_layers(out_dir)
    sinks = [i for i, bb in enumerate(layers) if bb["dormant_bos"][0] > 0.3 and bb["active_bos"][0] < 0.1]
    assert sinks, [(bb["dormant_bos"], bb["active_bos"]) for bb in layers]
    backcopy_loss, val_loss = final_backcopy_loss(out_dir)
    assert backcopy_loss < 0.05  # the copy rule is learned (near 0 nats) ...
    bayes = BigramBackcopy("val", 1, 64).bayes_loss
    assert val_loss < bayes + 0.1  # ... and the bigram part close to the Bayes-optimal loss
    # the value drain: the sinking head's BOS value is smaller than the other tokens'
    assert layers[sinks[0]]["value_ratio"][0] < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("sink", ["logit", "kv_bias"])
def test_a_dedicated_slot_takes_over_the_dormant_mass(tmp_path, monkeypatch, sink):
    monkeypatch.chdir(REPO)
    out_dir = train_bb(tmp_path, sink, 800, f"--sink={sink}")
    layers, _ = bb_layers(out_dir)
    taken = [i for i, bb in enumerate(layers)
             if bb["dormant_slot"][0] > 0.5 and bb["dormant_slot"][0] > 2 * bb["dormant_bos"][0]]
    assert taken, [(bb["dormant_bos"], bb["dormant_slot"]) for bb in layers]
    assert final_backcopy_loss(out_dir)[0] < 0.05
