"""sgl-dsl: structured-generation programs in Python, with a local inference engine."""

__version__ = "0.1.0"
