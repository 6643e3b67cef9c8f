# The plain Bigram-Backcopy model (base.py) at width 64, as in the CPU study (config/study/bb.py), trained for
# 6000 steps with a checkpoint kept every 250 (step 0 included): the trajectory of its largest activation and
# of its BOS sink, read in docs/results.md (section 10). About 6 minutes of training on one thread.
#   python train.py config/bb/trajectory.py
#   python analyze.py trajectory out-bb/trajectory --report docs/results_trajectory
include("base.py")
out_dir = "out-bb/trajectory"
n_embd = 64
max_iters = 6000
eval_interval = 500
log_interval = 250
track_interval = 0  # the trajectory measures each kept checkpoint afterwards
keep_checkpoints = 250
