include("base.py")
sink = "softmax1"
out_dir = "out-sinks/softmax1"
