"""plantbus benchmarks: ``python -m bench [scenario ...]`` (``make bench``).

Each scenario prints one JSON line; see ``bench/README.md`` for what they measure.
"""
