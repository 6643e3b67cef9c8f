# The default char-level model with a BOS token at the start of every window, the setting in which models
# grow an attention sink on position 0. Each file beside this one adds one dedicated sink mechanism.
include("../train_shakespeare_char.py")
prepend_bos = True
out_dir = "out-sinks/none"
