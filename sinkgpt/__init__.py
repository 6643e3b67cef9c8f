"""
sinkgpt: the library behind the entry points train.py, sample.py, analyze.py, bench.py and study.py. The model
itself is model.py at the top of the repository (one readable file that imports nothing of ours).

One job per module; each module's opening comment says what it holds and what it may import:

    common          the repository root, the one-line error class, strict-JSON conversion
    config          every train.py key with its default and type; config files and --key=value flags
    runtime         device, precision, DDP processes, torch.compile, the allocator, peak FLOP/s
    checkpoint      atomic checkpoints, training progress, metrics.jsonl and its reader, loading a model
    live_log        live logging of metrics.jsonl's events to Weights & Biases (optional)
    pretrained      Hugging Face folders in and out (GPT-2, Llama, Mistral, Qwen2, GPT-NeoX), GGUF conversion
    tokenizer       GPT-2 BPE (offline), char-level, and a pretrained folder's tokenizer.json
    prep            the prepare scripts' shared code (tokenise, split, shard, meta.json)
    loader          the one loader factory: prepared token files or Bigram-Backcopy
    bigram_backcopy the Bigram-Backcopy synthetic task
    optim           AdamW / SGD / Muon, parameter groups, interventions on the optimizer state
    training        the pieces of train.py's loop: model to start from, lr schedule, evaluation, the step
    generation      faster CPU decoding (one-row products as batched row-block products)
    benchmark       what bench.py times with: step runners, peak memory, --profile, timed generation
    decode_floor    what a generated token costs at least (bench.py --generate --decode_floor)
    vs_transformers transformers' own model of a folder beside ours (bench.py --vs_transformers)
    quantize        simulated post-training quantization (PyTorch fake-quant): W8A8 and W4 losses
    streaming       perplexity with a rolling KV cache (StreamingLLM): the first K + W recent tokens
    stats           sink and massive-activation statistics (pure functions)
    measure         one hooked pass over probe batches that collects per-layer statistics
    tracking        what training tracks: activations, sinks and optimizer state
    probes          interventions and probes (intervene, ablate, repeat, attribute) and their batches
    report          the analysis report and the comparison of runs
    plots           the PNG plots
    study_runner    the study: every variant x seed, resumable, one report

Rules (tests/test_layout.py checks them): no import cycles; a library module never imports an entry point;
an entry point imports no other entry point.
"""
