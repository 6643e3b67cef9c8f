include("base.py")
sink = "bos_override"
out_dir = "out-sinks/bos_override"
