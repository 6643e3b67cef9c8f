# trajectory.py with sigmoid attention (Gu et al.; config/bb/sigmoid_attn.py), the one variant of the CPU study
# whose largest activation outgrows its median (426x at step 1200, docs/results.md section 1): its trajectory
# beside the softmax model's, 4000 steps with a checkpoint kept every 200. About 5 minutes on one thread.
#   python train.py config/bb/trajectory_sigmoid.py
#   python analyze.py trajectory out-bb/trajectory_sigmoid --report docs/results_trajectory/sigmoid
include("trajectory.py")
attn_fn = "sigmoid"
out_dir = "out-bb/trajectory_sigmoid"
max_iters = 4000
keep_checkpoints = 200
