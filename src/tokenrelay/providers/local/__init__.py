"""The embedded local model: a provider in the gateway, llama.cpp in worker processes.

``provider`` is the `Provider`; ``request`` and ``format`` translate OpenAI's shapes; ``pool``
supervises the worker processes that ``worker`` runs; ``wire`` is what they say to each other;
``extra_buffers`` remembers which llama.cpp kernels this machine can run.
"""

from tokenrelay.providers.local.provider import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_PACKAGE,
    LocalProvider,
    check_model,
    default_model_path,
)

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "LocalProvider",
    "check_model",
    "default_model_path",
]
