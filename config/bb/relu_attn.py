# ReLU attention (scores through ReLU, divided by the number of visible keys): the paper reports no sink.
include("base.py")
attn_fn = "relu"
out_dir = "out-bb/relu_attn"
