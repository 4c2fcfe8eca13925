"""Deployment pull step: where a worker's flow run works, wherever the checkout lives.

The flows import from the installed package, so the working directory only gives meaning to
relative URLs in parameters (`out=runs/rte`, `data_dir=../shared/data/glue`).
"""

from __future__ import annotations

import os
from pathlib import Path


def work_in_checkout() -> dict[str, str]:
    """Change to $BERTVISION_HOME if set, else to the checkout this module was imported from (an
    editable install); in an image without either, stay in the working directory."""
    checkout = Path(__file__).resolve().parents[1]
    home = os.environ.get("BERTVISION_HOME") or (
        str(checkout) if (checkout / "pyproject.toml").is_file() else os.getcwd()
    )
    if not Path(home).is_dir():
        raise FileNotFoundError(f"BERTVISION_HOME={home} is not a directory")
    os.chdir(home)
    return {"directory": home}
