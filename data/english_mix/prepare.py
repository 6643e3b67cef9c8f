"""
english_mix: an offline English corpus for GPU runs where FineWeb-Edu cannot be fetched, in GPT-2 BPE shards
(~24M tokens with the bundled Shakespeare). The text is taken from three Debian 12 packages: the GCIDE
dictionary (dict-gcide), the Python 3.11 documentation (python3.11-doc) and the Perl 5.36 documentation
(perl-doc); build.py beside this file builds the --input folder from them, and SOURCE.md says what each part
is and its licence.
Every 10th document is held out for val.

    python data/english_mix/build.py --out_dir /path/to/english_mix           # once: from the Debian packages
    python data/english_mix/prepare.py --input /path/to/english_mix           # its *.jsonl.gz files + Shakespeare
    python data/english_mix/prepare.py --input /path/to/english_mix --no-with_shakespeare
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # repo root
from sinkgpt import prep

if __name__ == "__main__":
    parser = prep.sharded_parser(__doc__, __file__, val_fraction=0.1)
    parser.add_argument("--with_shakespeare", action=argparse.BooleanOptionalAction, default=True,
                        help="also include the bundled Shakespeare corpus (one document per play)")
    args = parser.parse_args()
    if not args.input:
        sys.exit("error: give --input: the folder of english_mix's .jsonl.gz files (data/english_mix/SOURCE.md)")
    if args.with_shakespeare:
        args.input = list(args.input) + [prep.BUNDLED_SHAKESPEARE]
    prep.sharded_main(args)
