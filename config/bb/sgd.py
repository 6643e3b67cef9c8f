# SGD with momentum instead of Adam: the paper reports the sink stays but the BOS residual peak does not grow.
include("base.py")
optimizer = "sgd"
learning_rate = 0.03
momentum = 0.9
out_dir = "out-bb/sgd"
