# Character-level GPT on the complete works of Shakespeare, sized for a laptop CPU (about 3 minutes on 2 cores).
# The data is prepared automatically on first use (data/shakespeare_char/prepare.py).
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
log_interval = 50

batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1
