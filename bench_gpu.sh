#!/usr/bin/env bash
# One call that checks and times the GPU path: GPT-2 124M (12x12x768, seq 1024, bf16, compiled) step time,
# tokens/s, MFU and peak memory for sink=none and every fused sink option, side by side in one process each
# family, then KV-cache generation. Needs no prepared data (bench.py steps on random tokens).
#   bash bench_gpu.sh [extra --key=value flags]      (e.g. --batch_size=16 on a smaller card)
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
flags="config/gpt2_124m.py --gradient_accumulation_steps=1 --steps=20 --warmup=5 --rounds=3 $*"
python bench.py $flags --compare=sink=none,token,logit,softmax1,kv_bias,k_bias,bos_override
python bench.py $flags --compare=attn_gate=none,headwise,elementwise
python bench.py --generate --device=cuda
