# Sigmoid attention without row normalisation (Gu et al.): nothing forces a row to put its mass anywhere.
include("base.py")
attn_fn = "sigmoid"
out_dir = "out-bb/sigmoid_attn"
