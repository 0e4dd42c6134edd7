"""Peer systems, each a worker module run in its own environment (see ``__main__``).

Every worker is ``python -m benchmarks.programs.peers.<name> SIZE [WORKLOAD ...]`` with
``BENCH_MODEL_DIR`` (the float32 Hugging Face folder) and ``BENCH_GGUF`` (the Q4_1 GGUF) in
the environment, and prints one JSON line (``measure.peer_main``).
"""
