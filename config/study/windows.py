# Sliding windows on the CPU: does the need for a sink grow as the window shrinks, and does a dedicated one take
# it? Bigram-Backcopy (config/bb/base.py: 3 layers, 1 head, width 64, ReLU MLP, AdamW lr 3e-3) at sequence 256 with
# rotary positions (translation-invariant, as in the windowed models that stream: Mistral, gpt-oss), batch 8 (the
# tokens per step of the 64-token study), 1200 steps. Windows 8, 16, 64 and full attention, each plain, with a
# learned sink logit, and with a headwise output gate; 2 seeds. Streaming keeps nothing but the last 64 tokens.
#   python study.py config/study/windows.py
base = "config/bb/base.py"
overrides = {"n_embd": 64, "block_size": 256, "batch_size": 8, "pos_emb": "rope", "max_iters": 1200,
             "eval_interval": 200, "track_interval": 100, "log_interval": 200}
variants = {}
for _window in (0, 64, 16, 8):
    _name = f"w{_window}" if _window else "full"
    variants[_name] = {"attn_window": _window} if _window else {}
    variants[f"{_name}_logit"] = dict(variants[_name], sink="logit")
    variants[f"{_name}_gate"] = dict(variants[_name], attn_gate="headwise")
seeds = [1337, 1338]
out_root = "out-study/windows"
report_dir = "docs/results_windows"
repeat_text = "a"
stream_window = 64
stream_tokens = 1024
