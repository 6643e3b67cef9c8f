# Continue a finished Bigram-Backcopy baseline (the first seed of `python study.py config/study/bb.py`) for
# 600 more steps with its optimizer state restored. fresh.py and zero_m.py change one thing each; compare with
#   python analyze.py compare out-continue/restored out-continue/fresh out-continue/zero_m --report reports/continue
include("../bb/base.py")
n_embd = 64
init_from = "resume"
resume_from = "out-study/bb/baseline/seed1337"
out_dir = "out-continue/restored"
max_iters = 1800
eval_interval = 200
log_interval = 100
track_interval = 50
# the weights that write the largest activation of this baseline (residual dim 39, layers 1-2, found with
# `python analyze.py attribute out-study/bb/baseline/seed1337 --pos 39 --dim 39`): their moments are logged
track_params = ["transformer.h.*.mlp.c_proj.weight[39, :]"]
