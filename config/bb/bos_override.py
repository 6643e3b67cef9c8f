include("base.py")
sink = "bos_override"
out_dir = "out-bb/bos_override"
