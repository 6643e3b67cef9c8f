# Variant sets that more than one study asks, included with include("_variants.py"). Not a study itself: names
# starting with "_" are not study keys, so nothing here is read until a study assigns it.

# every dedicated sink option (and sigmoid attention, which needs none), each against the plain baseline
_SINK_VARIANTS = {
    "baseline": {},
    "token": {"sink": "token"},
    "logit": {"sink": "logit"},
    "softmax1": {"sink": "softmax1"},
    "kv_bias": {"sink": "kv_bias"},
    "k_bias": {"sink": "k_bias"},
    "bos_override": {"sink": "bos_override"},
    "gate_headwise": {"attn_gate": "headwise"},
    "sigmoid_attn": {"attn_fn": "sigmoid"},
}


def _pretrained_questions(writers):
    """The questions of L. Dial's GPT-2 bos_token study (2025) on a pretrained model's massive entry, given the
    parameter slices that write it: plain continuation at two learning rates with and without decay, each sink
    retrofitted, and the optimizer interventions on the writers."""
    return {
        "baseline": {},  # lr 1e-4, no decay
        "lr3e-4": {"learning_rate": 3e-4, "min_lr": 3e-5},
        "wd0.1": {"weight_decay": 0.1},
        "lr3e-4_wd0.1": {"learning_rate": 3e-4, "min_lr": 3e-5, "weight_decay": 0.1},
        "logit": {"sink": "logit"},
        "kv_bias": {"sink": "kv_bias"},
        "k_bias": {"sink": "k_bias"},
        "token": {"sink": "token"},
        "gate_headwise": {"attn_gate": "headwise"},
        "bos_override": {"sink": "bos_override"},
        "zero_m": {"moment_edits": [{"param": p, "moment": "m", "op": "zero", "every": 1} for p in writers]},
        "decay_writers": {"param_decay": [{"param": p, "weight_decay": 100.0} for p in writers]},  # 1% a step
        "sgd": {"optimizer": "sgd", "learning_rate": 0.1, "min_lr": 0.01},  # momentum 0.9, gradients clipped at 1
        "muon": {"optimizer": "muon", "muon_lr": 4e-3},  # hidden matrices; the rest AdamW at lr 1e-4
    }
