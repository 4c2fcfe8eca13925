"""Prefect tasks: each a one-liner over a `bertvision` core function, with its policy (retries,
timeout, cache) on the decorator. Arguments are configs and URLs, never tensors."""
