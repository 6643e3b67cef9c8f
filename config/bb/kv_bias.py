include("base.py")
sink = "kv_bias"
out_dir = "out-bb/kv_bias"
