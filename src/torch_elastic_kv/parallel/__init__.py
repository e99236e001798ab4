"""Tensor parallel serving: one Engine per rank, in step (``tp_engine``), over a Llama model
whose attention heads and MLP are split between the ranks (``shard``).

Levels: a group of N ranks (processes; gloo on CPU, NCCL for the model on CUDA with one GPU
per rank) -> one Engine per rank over its shard of the KV heads -> one elastic page pool per
rank. Rank 0 takes the requests and broadcasts every
change of state; the other ranks replay it (``docs/TENSOR_PARALLEL.md``).
"""
