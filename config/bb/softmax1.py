include("base.py")
sink = "softmax1"
out_dir = "out-bb/softmax1"
