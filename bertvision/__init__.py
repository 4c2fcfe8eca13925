"""BERTVision: store the hidden states of every encoder layer once, train small adapters on them.

The core library: plain functions and small classes, no orchestration import. Prefect lives in
`tasks/` and `flows/` only.
"""

__version__ = "0.1.0"
