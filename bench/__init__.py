"""Benchmarks against what users would pick instead, and the load and fault runs.

    python -m bench [--quick] [--only NAME] [--sizes tiny,vitb16]   # make bench: table + bench/results/latest.json
    python -m bench.load [--soak 600]                                # make load: 60 s at concurrency 32, zero errors
    python -m bench.faults                                           # make faults: kill things, count what was lost
    python bench/baseline_cnn.py ...                                 # a small CNN from scratch (accuracy context)

Every ratio is ours / baseline, measured side by side in the same run, warm-up excluded, median of
several repetitions. See docs/benchmarks.md.
"""
