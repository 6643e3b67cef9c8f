# The GPU study for one H100 within about 15 minutes: GPT-2 124M-shaped (config/gpt2_124m.py: 12 layers, 12
# heads, 768 dims, sequence 1024, bf16, compiled) on FineWeb-Edu, windows aligned to document starts so every
# window begins with BOS. Baseline and the options that matter most, one seed (time-bound), ~20M tokens each.
#   python data/fineweb/prepare.py --max_tokens 1e8   # once, where the hub is reachable
#   python study.py config/study/gpu.py
# Offline: python data/english_mix/prepare.py --input DIR (data/english_mix/SOURCE.md), then add
#   overrides["dataset"] = "english_mix" below.
base = "config/gpt2_124m.py"
overrides = {"max_iters": 300, "warmup_iters": 30, "lr_decay_iters": 300, "learning_rate": 1.5e-3, "min_lr": 1.5e-4,
             "eval_interval": 100, "eval_iters": 10, "log_interval": 25, "track_interval": 50}
variants = {
    "baseline": {},
    "kv_bias": {"sink": "kv_bias"},
    "logit": {"sink": "logit"},
    "gate_headwise": {"attn_gate": "headwise"},
}
seeds = [1337]
out_root = "out-study/gpu"
report_dir = "docs/results_gpu"
probe_batches = 2
probe_batch_size = 8
repeat_text = " the"
