"""Megatron-style tensor, sequence, pipeline and data parallelism on torch.distributed.

Knows nothing about LLaMA: layers, communication patterns, schedules and optimisers only.
"""
