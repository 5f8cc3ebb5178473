"""The engine: how methods are attached to an unmodified transformers VLM and run (see docs/architecture.md).

``method`` (the interface a method implements, its Host and the registry), ``pipeline`` (hooks, per-call flow),
``state`` (which tokens each layer holds), ``attention`` (the in-layer attention point), ``cache`` (the KV-cache
layer that holds a token selection), ``static_decode`` (decode steps replayed from CUDA graphs), ``side_stream``
(a second sequence on the unwrapped model), ``ranking`` (top-k selection helpers).
"""
