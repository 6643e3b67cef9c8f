# Bigram-Backcopy (Guo et al. 2024, arXiv 2410.13835): a synthetic task on which an attention sink, a drained
# BOS value and a growing BOS residual appear within minutes on a CPU. Every sequence starts with BOS; after a
# trigger character (space, 'e', 't') the next token copies the one two back, otherwise it follows the
# character-bigram table of the bundled Shakespeare. The paper's model: 1-3 layers, 1 head, ReLU MLP,
# pre-LayerNorm, learned positions, no biases, untied head, Adam. See docs/reference.md, "Bigram-Backcopy".
out_dir = "out-bb/base"
dataset = "bigram_backcopy"
bb_triggers = 3
eval_interval = 100
eval_iters = 10
log_interval = 25
track_interval = 50

batch_size = 32
block_size = 64
n_layer = 3
n_head = 1
n_embd = 128
dropout = 0.0
bias = False
tie_embeddings = False
mlp_act = "relu"

optimizer = "adamw"
learning_rate = 3e-3
beta1 = 0.9
beta2 = 0.99
weight_decay = 1e-4
grad_clip = 0.0
decay_lr = False
warmup_iters = 0
max_iters = 2000  # a few minutes on 2 CPU cores; layer 0's BOS sink: 0.71 at step 1000, 0.99 at 2000
