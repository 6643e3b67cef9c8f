# The ablation flags on the default char-level model (BOS-first windows), one short run each at the same
# budget (600 iterations, about 40 seconds each on 2 CPU cores): shows every flag alive, not only wired.
#   python study.py config/study/flags_cpu.py
base = "config/train_shakespeare_char.py"
overrides = {"max_iters": 600, "lr_decay_iters": 600, "eval_interval": 300, "eval_iters": 20,
             "log_interval": 300, "track_interval": 300, "prepend_bos": True}
variants = {
    "gpt2_default": {},
    "pos_emb=rope": {"pos_emb": "rope"},
    "pos_emb=none": {"pos_emb": "none"},
    "norm=rmsnorm": {"norm": "rmsnorm"},
    "norm_pos=post": {"norm_pos": "post"},
    "qk_norm": {"qk_norm": True},
    "mlp_act=relu2": {"mlp_act": "relu2"},
    "mlp_act=swiglu": {"mlp_act": "swiglu"},
    "bias=False": {"bias": False},
    "untied": {"tie_embeddings": False},
    "softcap=30": {"logit_softcap": 30.0},
    "optimizer=muon": {"optimizer": "muon"},
}
seeds = [1337]
out_root = "out-study/flags"
report_dir = "docs/results_flags"
repeat_text = "a"
