# GPT-2 124M (12 layers, 12 heads, 768 dims, context 1024) on one GPU, bf16 autocast + torch.compile.
# Data: FineWeb-Edu (prepare with python data/fineweb/prepare.py, as nanoGPT prepares OpenWebText), windows
# aligned to document starts, so every window begins with BOS. Offline: --dataset=english_mix, prepared with
# python data/english_mix/prepare.py --input DIR (data/english_mix/SOURCE.md).
# On 2, 4 or 8 GPUs: torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py (the same run: the
# accumulation count below is global, each process runs 8 / N micro-batches of it)
out_dir = "out-gpt2-124m"
dataset = "fineweb"
align_to_docs = True
eval_interval = 250
eval_iters = 20
log_interval = 10

batch_size = 8
block_size = 1024
gradient_accumulation_steps = 8  # 64 x 1024 = 65k tokens per step, on 1, 2, 4 or 8 GPUs
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
pad_vocab = True  # 50304 rows: faster matmuls

learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 200
max_iters = 5000
beta2 = 0.95
weight_decay = 0.1

device = "cuda"
dtype = "bfloat16"
compile = True
