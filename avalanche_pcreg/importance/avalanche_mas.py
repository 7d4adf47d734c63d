"""The MAS importance of Avalanche 0.6's ``MASPlugin``: :func:`.minibatch.avalanche_mas`, which
shares its loop with ``minibatch_fisher`` (kept importable from here)."""

from .minibatch import avalanche_mas

__all__ = ["avalanche_mas"]
