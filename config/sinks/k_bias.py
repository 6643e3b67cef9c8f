include("base.py")
sink = "k_bias"
out_dir = "out-sinks/k_bias"
