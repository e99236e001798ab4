"""Memory layer: arenas (reserved address space mapped on demand through a backend), per-device
budgets, host memory limits, and the torch pluggable allocator over the same C++ core.
"""
