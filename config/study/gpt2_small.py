# The SmolLM2 study (config/study/smollm2.py) for GPT-2 small, for users who have its weights (a local Hugging
# Face folder, or the hub name where the hub is reachable) and a GPU: the bos_token study's own model, whose
# massive activation is dim 447 at position 0 (about 3000, from block 2 on). Not in docs/results.md; the budget
# is sized for one GPU: 500 steps x 16 x 256 tokens a run.
# Before running, list the neurons that write the entry with
#   python analyze.py attribute gpt2 --pos 0 --dim 447
# and add their c_fc rows to _WRITERS (the rows of the up-projection that feed them).
#   python study.py config/study/gpt2_small.py
base = "config/continue/gpt2_fresh.py"

_WRITERS = ["transformer.h.2.mlp.c_proj.weight[447, :]"]
overrides = {
    "batch_size": 16, "gradient_accumulation_steps": 1, "block_size": 256, "max_iters": 500, "lr_decay_iters": 500,
    "warmup_iters": 20, "learning_rate": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0, "sink_lr_mult": 100.0,
    "eval_interval": 100, "eval_iters": 20, "log_interval": 25, "track_interval": 25, "track_params": _WRITERS,
}
include("_variants.py")
variants = _pretrained_questions(_WRITERS)  # the SmolLM2 study's questions
seeds = [1337, 1338]
out_root = "out-study/gpt2_small"
report_dir = "docs/results_gpt2_small_study"
massive_entry = [2, 0, 447]
probe_batches = 4
probe_batch_size = 8
repeat_text = " the"
repeat_n = 128
stream_tokens = 1024
stream_window = 64
