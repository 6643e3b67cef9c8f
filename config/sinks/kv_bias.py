include("base.py")
sink = "kv_bias"
out_dir = "out-sinks/kv_bias"
