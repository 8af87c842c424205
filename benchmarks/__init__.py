"""pangu_ops microbenchmarks (installed as `pangu_ops.benchmarks`, driven by `pangu-ops bench`)."""
