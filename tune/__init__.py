"""The Ray Tune search entry point: `python -m tune` (the library side is pneumoray.search).

`from ray import tune` is unaffected: that names ray's subpackage, not this folder.
"""
