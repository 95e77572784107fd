"""Workloads for benchmarks: request traces (arrival processes, length distributions, JSONL files)
and the metrics computed over served requests. The offline simulator and `kvferry bench serve`
(a live cluster) share both."""
