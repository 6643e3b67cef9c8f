# As restored.py, with the first moment (Adam's m) of the MLP output rows that write residual dim 39 zeroed
# after every step: those rows then move by the current gradient only, without momentum.
include("restored.py")
moment_edits = [{"param": "transformer.h.*.mlp.c_proj.weight[39, :]", "moment": "m", "op": "zero", "every": 1}]
out_dir = "out-continue/zero_m"
