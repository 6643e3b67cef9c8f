include("base.py")
attn_gate = "elementwise"
out_dir = "out-sinks/gate_elementwise"
