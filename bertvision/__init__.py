"""BERTVision: store the hidden states of every encoder layer once, train small adapters on them.

The core library: plain functions and small classes, no orchestration import. Prefect lives in
`tasks/` and `flows/` only.
"""

from importlib import metadata
from pathlib import Path


def _version() -> str:
    """The installed package's version; from pyproject.toml beside a source tree not installed."""
    try:
        return metadata.version("bertvision")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()
