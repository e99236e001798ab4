"""transformers layer: the ``Cache`` subclass, the step planner, the paged attention function and
its native decode kernel, prepacked linear weights, and version compatibility.
"""
