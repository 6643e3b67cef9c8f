include("base.py")
attn_gate = "headwise"
out_dir = "out-bb/gate_headwise"
