# The GPU study for one H100 within one short device session (~15 minutes with start-up): GPT-2 124M-shaped
# (config/gpt2_124m.py: 12 layers, 12 heads, 768 dims, sequence 1024, bf16, compiled) on data/english_mix (the
# bundled Shakespeare plus ../shared/data/english_mix, ~24M tokens), windows aligned to document starts so every
# window begins with BOS. Baseline and the options that matter most, one seed (time-bound), ~20M tokens each.
#   python data/english_mix/prepare.py          # once, here (12 s); carry data/english_mix to the GPU machine
#   python study.py config/study/gpu.py
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
