"""Helpers for benchmarks/bench_sparse_attention_ops.py: timing, roofline, FLOP/byte counting, peers, reports.

Imported by putting ``benchmarks/`` on ``sys.path`` (the benchmark script does this); nothing here is part of
the installed msa packages.
"""
