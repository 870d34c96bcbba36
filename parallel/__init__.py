"""How a model is split: topology, the MoE layer, FSSDP, tensor and pipeline parallelism."""
