include("base.py")
sink = "logit"
out_dir = "out-sinks/logit"
