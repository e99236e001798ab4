"""Build output for test aids (the fake CUDA driver library); see torch_elastic_kv.testing."""
