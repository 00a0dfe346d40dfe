"""Pipeline parallelism: which layers each stage holds (partition), how activations and
gradients cross between stages (p2p), and in which order micro-batches run (schedules)."""
