include("base.py")
sink = "logit"
out_dir = "out-bb/logit"
