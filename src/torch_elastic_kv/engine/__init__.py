"""Engine layer: continuous batching over the KV layer and a transformers model: requests and
their sampling parameters, the scheduler, the elastic policy, the model runner and the
memory controller.
"""
