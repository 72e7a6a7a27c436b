"""tokenrelay: an OpenAI-compatible streaming gateway with an embedded local model."""

__version__ = "0.1.0"

__all__ = ["__version__"]
