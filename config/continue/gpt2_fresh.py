# Continue released GPT-2 weights (a local Hugging Face folder, or the hub name where the hub is reachable) on
# the bundled Shakespeare with a fresh optimizer, every window starting at a document (BOS first, as in the
# bos_token study), tracking the massive activation (dim 447 at position 0, about 3000 in GPT-2 small).
init_from = "gpt2"
dataset = "shakespeare"
align_to_docs = True
out_dir = "out-continue/gpt2_fresh"
batch_size = 4
block_size = 256
gradient_accumulation_steps = 4
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 20
max_iters = 500
eval_interval = 50
eval_iters = 10
log_interval = 10
track_interval = 25
dropout = 0.0
track_params = ["transformer.h.2.mlp.c_proj.weight[447, :]"]
