"""
english_mix: the local English corpus for GPU runs (GCIDE dictionary, Python and Perl docs from
<repo>/../shared/data/english_mix, plus the bundled Shakespeare) in GPT-2 BPE shards, ~24M tokens.
Every 10th document is held out for val.

    python data/english_mix/prepare.py
    python data/english_mix/prepare.py --input /path/to/english_mix --no-with_shakespeare
"""
import argparse
import os
import sys

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO_ROOT)
from sinkgpt import prep

DEFAULT_INPUT = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "english_mix"))

if __name__ == "__main__":
    parser = prep.sharded_parser(__doc__, __file__, inputs=[DEFAULT_INPUT], val_fraction=0.1)
    parser.add_argument("--with_shakespeare", action=argparse.BooleanOptionalAction, default=True,
                        help="also include the bundled Shakespeare corpus (one document per play)")
    args = parser.parse_args()
    if args.with_shakespeare:
        args.input = list(args.input) + [prep.BUNDLED_SHAKESPEARE]
    prep.sharded_main(args)
