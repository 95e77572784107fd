"""Test fakes and wait helpers shared by the tests and the benchmarks (installed code, so that
`kvferry bench` can use them): a bounded wait (wait.py), the fake scheduler and token sink
(fakes.py, with the stream stitching in streams.py) and a `kvferry worker` launcher (worker.py)."""
