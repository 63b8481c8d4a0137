"""The model format: the shard manifest, the weight quantizer, the KV cache's quantized
format, the family specs (arch, families/), the built-in shapes and ALiBi slopes.
arch, shapes, manifest and families/ are torch-free (the planner reads them); quant,
kv_quant and alibi compute with torch."""
