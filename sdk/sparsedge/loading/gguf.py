"""GGUF files, read through transformers' GGUF support: the config with
AutoConfig.from_pretrained(folder, gguf_file=...), the tokenizer with AutoTokenizer, the weights with
transformers' GGUF checkpoint loader (dequantized to fp32, q/k already un-permuted to the halves
RoPE layout). The dequantized state dict exists once, while `tensors()` runs; each tensor is
dropped from it as it is handed out."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch
from loguru import logger

from sparsedge.tokenizer import Tokenizer
from sparsedge.loading.base import ModelFormatError, ModelSource
from sparsedge.loading.hf import hf_config_to_model_config, hf_to_canonical, merge_ids


class GGUFSource(ModelSource):
    def __init__(self, path: Path, tokenizer: Path | None = None, name: str | None = None):
        from transformers import AutoConfig

        path = Path(path)
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFormatError(f"{path} does not start with the GGUF magic bytes; not a GGUF file")
        t0 = time.perf_counter()
        try:
            hf_cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except ValueError as exc:
            if "not supported" in str(exc):
                raise ModelFormatError(f"{path}: {exc}") from exc
            raise
        self.hf_config = hf_cfg
        cfg = hf_config_to_model_config(hf_cfg.to_dict(), name=name or path.stem)
        logger.debug("GGUF config of {} read in {:.1f} s", path, time.perf_counter() - t0)
        super().__init__(path, cfg)
        self.tokenizer_path = tokenizer

    def _load_tokenizer(self) -> Tokenizer:
        from sparsedge.tokenizer import HFTokenizer, load_tokenizer

        cfg = self.config
        if self.tokenizer_path is not None:
            tok = load_tokenizer(self.tokenizer_path, name=cfg.name, extra_eos_ids=cfg.eos_token_ids)
        else:
            tok = HFTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name, name=cfg.name,
                                              extra_eos_ids=cfg.eos_token_ids)
        cfg.eos_token_ids = merge_ids(cfg.eos_token_ids, tok.eos_token_ids)
        return tok

    def _load_state_dict(self) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        t0 = time.perf_counter()
        # a skeleton on the meta device gives transformers the GGUF -> parameter name map
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.hf_config)
        try:
            parsed = load_gguf_checkpoint(str(self.path), return_tensors=True, model_to_load=skeleton,
                                          torch_dtype=torch.float32)
        except TypeError:  # older transformers: no torch_dtype argument
            parsed = load_gguf_checkpoint(str(self.path), return_tensors=True, model_to_load=skeleton)
        del skeleton
        sd = parsed["tensors"]
        logger.debug("GGUF tensors of {} dequantized in {:.1f} s", self.path, time.perf_counter() - t0)
        return sd

    def _raw_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from sparsedge.loading.base import canonical_order

        sd = self._load_state_dict()
        names = {}
        for hf_name in list(sd):
            c = hf_to_canonical(hf_name)
            if c is None:
                del sd[hf_name]
            else:
                names[c] = hf_name
        for c in canonical_order(names):
            t = sd.pop(names[c])
            if c == "lm_head" and self.config.tie_embeddings:
                continue
            yield c, t.float() if t.dtype != torch.float32 else t
            del t

    def describe(self) -> str:
        return f"gguf:{self.path}"
