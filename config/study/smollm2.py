# The questions of L. Dial's GPT-2 bos_token study (2025) on a real massive activation: SmolLM2-135M-Instruct (fetch it first with
# `python data/models/smollm2.py`) continued on the bundled Shakespeare in its own tokenizer, BOS first, every
# run from the same pretrained weights with a fresh optimizer, the same batches and the same budget:
#   plain continuation at two learning rates, with and without weight decay (the optimizer is always reset:
#   the pretrained one is not published), so a drop of the massive entry can be told apart from lr and decay;
#   each dedicated sink retrofitted at its neutral start (init_sinks_from_pretrained);
#   the optimizer interventions on the weights that write the massive entry (block 11, dim 507 at position 0:
#   the down-projection row 507 and the gate/up rows of its two largest writers, neurons 1229 and 1487, found
#   with `python analyze.py attribute data/models/SmolLM2-135M-Instruct --pos 0 --dim 507`).
# Budget for a 2-core CPU: 40 steps x 4 sequences x 64 tokens (10,240 tokens a run), one training thread per
# run (so a second job can share the machine), 5-9 minutes of training a run beside other jobs (Muon: 23), and about 2 minutes of final analysis each.
#   python study.py config/study/smollm2.py
# The study resumes where it stopped (rerun the command); --report_only rebuilds the report.
base = "config/continue/smollm2.py"

_WRITERS = ["transformer.h.11.mlp.c_proj.weight[507, :]",  # the row that writes dim 507
           "transformer.h.11.mlp.c_fc.weight[1229, :]", "transformer.h.11.mlp.c_fc.weight[2765, :]",  # gate, up 1229
           "transformer.h.11.mlp.c_fc.weight[1487, :]", "transformer.h.11.mlp.c_fc.weight[3023, :]"]  # gate, up 1487
overrides = {
    "compile": False,  # a 40-step run does not earn back the compile time
    "batch_size": 4, "block_size": 64, "max_iters": 40, "lr_decay_iters": 40, "warmup_iters": 4,
    "learning_rate": 1e-4, "min_lr": 1e-5, "weight_decay": 0.0,
    "sink_lr_mult": 100.0,  # the retrofitted sink parameters start neutral and must move within 40 steps
    "eval_interval": 40, "eval_iters": 8, "log_interval": 10, "track_interval": 10,
    # the row's m / v / update norms, and the signed m and update of its two largest weights
    "track_params": [_WRITERS[0], "transformer.h.11.mlp.c_proj.weight[507, 1229]",
                     "transformer.h.11.mlp.c_proj.weight[507, 1487]"],
}
include("_variants.py")
variants = _pretrained_questions(_WRITERS)
seeds = [1337]
out_root = "out-study/smollm2"
report_dir = "docs/results_smollm2_study"
massive_entry = [11, 0, 507]  # the pretrained model's entry, ablated in every run
reference = "data/models/SmolLM2-135M-Instruct"  # the table's first row: the model before any run
probe_batches = 1
probe_batch_size = 4
probe_block_size = 64  # the runs' context (block_size 64 bounds every probe of a continued run)
repeat_text = " the"
repeat_n = 64
stream_tokens = 256
stream_window = 32
threads = 1
