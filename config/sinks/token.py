include("base.py")
sink = "token"
n_sink_tokens = 1  # > 1 = registers
out_dir = "out-sinks/token"
