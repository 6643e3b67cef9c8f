# The dedicated sink options on the default char-level model with BOS-first windows (config/sinks/base.py), one
# short run each at the same budget (600 iterations, about 40 seconds each on 2 CPU cores): the char-level
# variants the outlier, quantization and streaming measurements run on beside Bigram-Backcopy and SmolLM2.
#   python study.py config/study/sinks_char.py
base = "config/sinks/base.py"
overrides = {"max_iters": 600, "lr_decay_iters": 600, "eval_interval": 300, "eval_iters": 20,
             "log_interval": 300, "track_interval": 300}
include("_variants.py")
variants = _SINK_VARIANTS
seeds = [1337]
out_root = "out-study/sinks_char"
report_dir = "docs/results_sinks_char"
repeat_text = "a"
stream_tokens = 768  # three times the context of 256
stream_window = 64
