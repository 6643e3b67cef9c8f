"""
OpenWebText in GPT-2 BPE shards of --shard_size tokens (train_000.bin, ..., val_000.bin),
streamed with the datasets library (parquet, no loading script) and tokenised in --num_proc processes.

    python data/openwebtext/prepare.py
    python data/openwebtext/prepare.py --input local_dir_of_parquet_or_jsonl/     # offline
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # repo root
from sinkgpt import prep

if __name__ == "__main__":
    parser = prep.sharded_parser(__doc__, __file__, name="Skylion007/openwebtext")
    prep.sharded_main(parser.parse_args())
