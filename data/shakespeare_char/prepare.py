"""
Character-level Shakespeare: vocabulary = the sorted characters of the corpus, plus one
end-of-text id (the last) that precedes every document.

    python data/shakespeare_char/prepare.py                     # bundled corpus, 42 plays/poems
    python data/shakespeare_char/prepare.py --input my.txt dir/ --out_dir data/mine_char
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # repo root
from sinkgpt import prep

if __name__ == "__main__":
    prep.text_prepare_main("char", __file__)
