"""An OpenAI-compatible HTTP server over the Engine: ``python -m torch_elastic_kv serve``.

Modules, one concept each: ``cli`` (options, checked before the model loads), ``server``
(model loading, uvicorn, the drain on SIGTERM), ``app`` (the routes), ``protocol`` (request and
response bodies), ``engine_thread`` (the one thread that steps the Engine, and the queues to
it), ``detokenize`` (token ids to text, stop strings), ``metrics`` (Prometheus), ``errors``
(OpenAI's error shape), ``default_model`` (the embedded small Llama and its tokenizer).

The server adds no memory logic: admission, preemption and give-back stay in the Engine and
its policy. Needs the ``serve`` extra (fastapi, uvicorn, pydantic, prometheus-client).
"""
