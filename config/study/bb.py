# The CPU study: Bigram-Backcopy (config/bb/base.py: 3 layers, 1 head, width 128, seq 64, batch 32, Adam
# lr 3e-3), where a plain model grows a persistent BOS sink within minutes. Baseline vs every dedicated sink
# option, plus the SGD and ReLU-attention contrasts, 2 seeds each, tracking on.
#   python study.py config/study/bb.py
base = "config/bb/base.py"
overrides = {"max_iters": 800, "eval_interval": 100, "track_interval": 50, "log_interval": 100}
variants = {
    "baseline": {},
    "token": {"sink": "token"},
    "logit": {"sink": "logit"},
    "softmax1": {"sink": "softmax1"},
    "kv_bias": {"sink": "kv_bias"},
    "k_bias": {"sink": "k_bias"},
    "bos_override": {"sink": "bos_override"},
    "gate_headwise": {"attn_gate": "headwise"},
    "sigmoid_attn": {"attn_fn": "sigmoid"},
    "relu_attn": {"attn_fn": "relu"},
    "sgd": {"optimizer": "sgd", "learning_rate": 0.03},
}
seeds = [1337, 1338]
out_root = "out-study/bb"
report_dir = "docs/results_bb"
repeat_text = "a"
