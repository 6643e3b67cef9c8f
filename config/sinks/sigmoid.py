include("base.py")
attn_fn = "sigmoid"
out_dir = "out-sinks/sigmoid"
