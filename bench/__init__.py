"""`make bench`: the issuer's throughput next to baselines measured in the same run (see docs/performance.md)."""
