"""
Shakespeare in GPT-2 BPE tokens (tiktoken; offline from data/gpt2_tokenizer when needed),
the end-of-text token 50256 before every document.

    python data/shakespeare/prepare.py                          # bundled corpus, 42 plays/poems
    python data/shakespeare/prepare.py --input my.txt dir/ --out_dir data/mine
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # repo root
from sinkgpt import prep

if __name__ == "__main__":
    prep.text_prepare_main("gpt2", __file__)
