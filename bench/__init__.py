"""openwham benchmarks: start-up latency and wall-time overhead against plain ``codex exec``.

Run with ``./bench/run`` (see ``bench/README.md``).
"""
