# nanoGPT's "CPU mini" settings (its README's laptop example on shakespeare_char), for side-by-side speed and
# loss comparisons: 4 layers, 4 heads, 128 dims, block 64, batch 12, lr 1e-3, 2000 iters, dropout 0.
out_dir = "out-nanogpt-cpu-mini"
dataset = "shakespeare_char_tail"  # nanoGPT's split: val = the last 10% of the concatenated works
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
# nanoGPT's model, not GPT-2's: no biases in Linear and LayerNorm (its default) and the exact erf GELU
# (its nn.GELU()); --mlp_act=gelu gives GPT-2's tanh GELU, about 10% slower per step on a CPU
bias = False
mlp_act = "gelu_exact"

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
