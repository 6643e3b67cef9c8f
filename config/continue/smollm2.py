# Continue SmolLM2-135M-Instruct (fetch it first: python data/models/smollm2.py) on the bundled Shakespeare in its
# own tokenizer (dataset shakespeare_smollm2, prepared on first use), BOS first as in its training, with a fresh
# optimizer, tracking the massive activation (position 0, dim 507, about 2.5e4 from block 11 on; docs/results.md)
# and the optimizer state of the down-projection row that writes it. Add --sink=... or --attn_gate=... to
# retrofit a dedicated sink at its neutral start. About 8 s per iteration on a 2-core CPU (compiled, float32).
init_from = "data/models/SmolLM2-135M-Instruct"
dataset = "shakespeare_smollm2"
prepend_bos = True
out_dir = "out-continue/smollm2"
batch_size = 4
block_size = 256
gradient_accumulation_steps = 1
learning_rate = 3e-5
min_lr = 3e-6
weight_decay = 0.0
warmup_iters = 10
max_iters = 100
eval_interval = 25
eval_iters = 4
log_interval = 5
track_interval = 10
track_params = ["transformer.h.11.mlp.c_proj.weight[507, :]"]
dtype = "float32"
compile = True  # on a CPU, compiling this model pays (1.3x a step; bench.py --vs_transformers)
