"""Program benchmarks: SGLang-paper workload shapes as sgl_dsl programs, against peers.

Each workload (``workloads/``) bundles deterministic data, its sgl_dsl program and the same
program written against the small ``Session`` protocol (``session.py``) that every peer
(``peers/``: transformers, guidance, outlines, llama-cpp-python) implements. Workload data
modules import only the standard library, so they load in the peers' own environments.

    python -m benchmarks.programs [--size full|tiny] [--only NAME ...] [--systems ...]
"""
