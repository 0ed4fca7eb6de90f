"""Where the shared test/evaluation data lives: $SPARSEDGE_DATA, default ../shared/data (from the repo root)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    env = os.environ.get("SPARSEDGE_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


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
