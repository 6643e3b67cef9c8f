# The CPU study: Bigram-Backcopy (config/bb/base.py: 3 layers, 1 head, seq 64, batch 32, Adam lr 3e-3) at
# width 64, where a plain model grows a persistent BOS sink within a few hundred steps (at width 128 it forms
# about twice slower). Baseline vs every dedicated sink option, plus the SGD and ReLU-attention contrasts,
# 2 seeds each, tracking on. 22.5 minutes of training on 2 CPU cores (the probes and report add a little).
#   python study.py config/study/bb.py
base = "config/bb/base.py"
overrides = {"n_embd": 64, "max_iters": 1200, "eval_interval": 200, "track_interval": 100, "log_interval": 200}
include("_variants.py")
variants = {**_SINK_VARIANTS, "relu_attn": {"attn_fn": "relu"},
            "sgd": {"optimizer": "sgd", "learning_rate": 0.03}}
seeds = [1337, 1338]
out_root = "out-study/bb"
report_dir = "docs/results_bb"
repeat_text = "a"
