"""sparsedge: on-device LLM decoding with FFN contextual sparsity and delta attention.

    from sparsedge import Session
    s = Session.load("smollm2-135m")
    print(s.generate("Once upon a time", max_new_tokens=32).text)
"""
from loguru import logger as _logger

from sparsedge import ops  # noqa: F401  (declares the sparsedge op schema)

__version__ = "0.1.0"

# Library code is quiet by default; the CLI's -v (or logger.enable("sparsedge")) turns logs on.
_logger.disable("sparsedge")


def __getattr__(name):  # lazy: importing sparsedge must not pull transformers in
    if name == "Session":
        from sparsedge.session import Session
        return Session
    raise AttributeError(name)


__all__ = ["Session", "__version__"]
