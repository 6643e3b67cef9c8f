# Does an explicit sink stay explicit when the model trains on? SmolLM2-135M-Instruct continued from the same
# weights, on the same real tokens, with a fresh AdamW at lr 1e-4, four ways:
#   plain          BOS first (its prediction at BOS left out of the loss, so every run predicts the same tokens)
#   converted      its BOS converted into a per-layer key/value slot (convert.py): exact at step 0
#   kv_bias_zero   the same slot started at zero (softmax1) on the pretrained weights, no BOS, tokens from 1
#   no_writers     converted, with the two MLP neurons that write the massive activation (block 11, neurons 1229
#                  and 1487) removed
# Prepare the two converted models first (about 40 s each):
#   python data/models/smollm2.py
#   python convert.py data/models/SmolLM2-135M-Instruct --out_dir out-explicit/smollm2
#   python convert.py data/models/SmolLM2-135M-Instruct --out_dir out-explicit/smollm2_no_writers \
#       --remove_neurons 11:1229,11:1487
#   python study.py config/study/explicit_smollm2.py       # resumable; --report_only rebuilds the report
# 200 steps x 4 sequences x 64 tokens (51,200 tokens a run). The plain run's windows are 65 tokens with BOS
# first, the others' 64 without: the loader draws the same windows for both, so all four see the same real tokens.
base = "config/continue/smollm2.py"

_SMOLLM2 = "data/models/SmolLM2-135M-Instruct"
_WRITERS = ["transformer.h.11.mlp.c_proj.weight[507, :]",  # the row that writes dim 507
            "transformer.h.11.mlp.c_fc.weight[1229, :]", "transformer.h.11.mlp.c_fc.weight[1487, :]"]  # gate rows
_NO_BOS = {"prepend_bos": False, "block_size": 64}
overrides = {
    "compile": False, "batch_size": 4, "max_iters": 200, "lr_decay_iters": 200, "warmup_iters": 10,
    "learning_rate": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0, "sink_lr_mult": 100.0,
    "eval_interval": 25, "eval_iters": 8, "log_interval": 25, "track_interval": 25, "track_params": _WRITERS,
}
variants = {
    "plain": {"init_from": _SMOLLM2, "prepend_bos": True, "bos_loss": False, "block_size": 65},
    "converted": {"init_from": "out-explicit/smollm2", **_NO_BOS},
    "kv_bias_zero": {"init_from": _SMOLLM2, "sink": "kv_bias", "pos_offset": 1, **_NO_BOS},
    "no_writers": {"init_from": "out-explicit/smollm2_no_writers", **_NO_BOS},
}
seeds = [1337]
out_root = "out-study/explicit_smollm2"
report_dir = "docs/results_explicit_study"
probe_batches = 1
probe_batch_size = 4
probe_block_size = 64
repeat_text = " the"
repeat_n = 64
stream_tokens = 256
stream_window = 32
threads = 1
