"""Reliability harness for the HTTP server: a mixed request load (`mix`), real HTTP
clients that run and check it (`client`), and a server run as a CLI subprocess whose memory
can be read (`server`). Used by `benchmarks/load_test.py` and its short CI variant in
`tests/test_reliability_load.py`."""
