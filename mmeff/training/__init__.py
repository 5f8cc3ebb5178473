"""Training of the small learned heads some methods need (DyVTE routers, the explainability mapper).

The VLM stays frozen; only the head's parameters are trained. ``mmeff train dyvte|explain`` is the CLI.
"""
