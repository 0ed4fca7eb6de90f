"""Where the shared test/evaluation data lives: $SPARSEDGE_DATA, default `../shared/data` relative to the
working directory (the layout of a checkout run from its root). Never a path relative to this file: an
installed package has no checkout around it. tests/conftest.py points the variable at the checkout's
neighbour when it is unset, so pytest works from any directory."""
from __future__ import annotations

import os
from pathlib import Path

ENV = "SPARSEDGE_DATA"
DEFAULT = Path("..") / "shared" / "data"


def data_dir() -> Path:
    env = os.environ.get(ENV)
    return Path(env) if env else DEFAULT


def data_path(relpath: str) -> Path:
    """Path of a shared data file; raises FileNotFoundError naming the variable to set."""
    p = data_dir() / relpath
    if not p.exists():
        raise FileNotFoundError(f"shared data file {relpath!r} not found at {p}; "
                                f"set SPARSEDGE_DATA to the folder holding it (see ../shared/data/README.md)")
    return p


STORIES260K = "stories260K/stories260K.bin"
STORIES260K_TOKENIZER = "stories260K/tok512.bin"
WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
TINYSTORIES_SAMPLE = "tinystories/TinyStories-valid-sample.txt"
