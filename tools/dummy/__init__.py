"""`--dummy` weights for benchmarks, made without a checkpoint: a model shape's
manifest (manifest.py), random values written into shard buffers (weights.py), and
a converted model directory on disk for the disk tier (files.py)."""
