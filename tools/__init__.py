"""Offline tools, not a service: the checkpoint converter (`strata convert`: convert,
which writes its shard files through shard_writer), dummy weights for benchmarks
(dummy/), and the KV store's attention kernel benchmark that `strata profile` runs
(bench_attention). The services import only dummy/, for `--dummy` runs (the weight
store makes and fills the weights, the compute node fills its GPU-resident layers)."""
