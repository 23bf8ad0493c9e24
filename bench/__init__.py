"""Benchmarks: each script compares the frozen base layer, the reference, fastpeft and the peer (HF PEFT).

Run from the repository root, e.g. `python -m bench.lora --help`; shared machinery lives in `bench.common`.
"""
