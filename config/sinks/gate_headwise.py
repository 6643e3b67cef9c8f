include("base.py")
attn_gate = "headwise"
out_dir = "out-sinks/gate_headwise"
