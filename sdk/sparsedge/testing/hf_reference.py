"""The same model in transformers, for parity tests and the decode benchmark's baseline."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def load_transformers_model(model: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """transformers' LlamaForCausalLM (or Qwen2/Mistral) for any model spec Session.load accepts."""
    from transformers import AutoModelForCausalLM

    from sparsedge.loading import ALIASES, llama2c_to_hf, resolve_alias

    p = Path(model)
    if not p.exists() and str(model).lower() in ALIASES:
        p = resolve_alias(str(model))
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            p = ggufs[0]
    if p.suffix.lower() == ".gguf":
        m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
    elif p.suffix.lower() == ".bin":
        with tempfile.TemporaryDirectory() as tmp:
            llama2c_to_hf(p, tmp)
            m = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    return m.eval()
