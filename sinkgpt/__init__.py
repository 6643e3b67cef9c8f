"""sinkgpt: the library behind the entry points (train.py, sample.py, analyze.py, bench.py, study.py)."""
