include("base.py")
sink = "k_bias"
out_dir = "out-bb/k_bias"
