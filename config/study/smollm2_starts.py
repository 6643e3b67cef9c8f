# The SmolLM2 study's retrofits rerun from starts that can learn (docs/explicit_sinks.md, "Retrofit starts"): the
# output gate at sigmoid(0) = 1/2 with c_proj doubled (exact; it started at sigmoid(10), where its slope is 4.5e-5,
# and its row equalled the baseline's to every digit), the sink logit at 0 (it started at -10) and the key/value
# slots at zero, against the same baseline, budget and batches as config/study/smollm2.py.
#   python study.py config/study/smollm2_starts.py
include("smollm2.py")
variants = {name: keys for name, keys in variants.items()
            if name in ("baseline", "logit", "kv_bias", "k_bias", "gate_headwise")}
out_root = "out-study/smollm2_starts"
report_dir = "docs/results_smollm2_starts"
