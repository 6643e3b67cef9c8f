include("base.py")
sink = "token"
out_dir = "out-bb/token"
