"""transformers checkpoint folders (config.json + *.safetensors, sharded or not), and the
translation of a transformers config (dict) into a ModelConfig, shared with the GGUF loader."""
from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Iterator

import torch
from loguru import logger

from sparsedge.config import ModelConfig, UnsupportedArchitectureError, check_architecture
from sparsedge.tokenizer import Tokenizer
from sparsedge.loading.base import ModelFormatError, ModelSource, canonical_order

_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh",
    "fatrelu": "fatrelu", "relu2": "relu2", "drelu": "drelu",
}
_THRESHOLD_KEYS = ("hidden_act_param", "fatrelu_threshold", "activation_threshold")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _ids(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if x is not None]
    return [int(v)]


def merge_ids(*groups: Iterable[int]) -> list[int]:
    out: list[int] = []
    for g in groups:
        for i in g:
            if int(i) not in out:
                out.append(int(i))
    return out


def _rope(d: dict) -> tuple[float, dict | None]:
    params = d.get("rope_parameters") or {}
    if params and not any(k in params for k in ("rope_theta", "rope_type", "type")):
        # per-attention-type parameters ({"full_attention": {...}}): take the full-attention ones
        params = params.get("full_attention") or next(iter(params.values()), {}) or {}
    scaling = d.get("rope_scaling") or {}
    theta = d.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    src = scaling or params
    rtype = src.get("rope_type") or src.get("type") or "default"
    if rtype == "default":
        return float(theta), None
    if rtype == "llama3":
        try:
            rs = {
                "rope_type": "llama3",
                "factor": float(src["factor"]),
                "low_freq_factor": float(src["low_freq_factor"]),
                "high_freq_factor": float(src["high_freq_factor"]),
                "original_max_position_embeddings": int(src["original_max_position_embeddings"]),
            }
        except KeyError as exc:
            raise ModelFormatError(f"llama3 RoPE scaling without {exc.args[0]!r} in the config") from None
        return float(theta), rs
    raise ModelFormatError(f"RoPE scaling type {rtype!r} is not supported (supported: default, llama3)")


def hf_config_to_model_config(d: dict, name: str, extra_eos_ids: Iterable[int] = ()) -> ModelConfig:
    """A transformers config (as a dict: config.json, or PretrainedConfig.to_dict()) -> ModelConfig.
    Raises UnsupportedArchitectureError for non-Llama-family model types."""
    if "text_config" in d and "hidden_size" not in d:
        d = {**d["text_config"], "model_type": d["text_config"].get("model_type", d.get("model_type"))}
    model_type = d.get("model_type")
    if not model_type:
        raise ModelFormatError(f"config of {name} has no model_type; cannot tell its architecture")
    check_architecture(model_type)
    try:
        dim = int(d["hidden_size"])
        n_heads = int(d["num_attention_heads"])
        n_layers = int(d["num_hidden_layers"])
        inter = int(d["intermediate_size"])
        vocab = int(d["vocab_size"])
    except KeyError as exc:
        raise ModelFormatError(f"config of {name} lacks {exc.args[0]!r}") from None
    act_name = d.get("hidden_act") or d.get("hidden_activation") or "silu"
    if act_name not in _ACTIVATIONS:
        raise ModelFormatError(f"FFN activation {act_name!r} of {name} is not supported "
                               f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
    act = _ACTIVATIONS[act_name]
    act_param = 0.0
    for k in _THRESHOLD_KEYS:
        if d.get(k) is not None:
            act_param = float(d[k])
            break
    theta, rope_scaling = _rope(d)
    if model_type in ("mistral", "qwen2"):
        sw = d.get("sliding_window")
        use_sw = d.get("use_sliding_window", model_type == "mistral")
        if use_sw and sw and sw < int(d.get("max_position_embeddings") or 0):
            logger.warning("{}: sliding_window={} is ignored; attention is full up to max_seq_len", name, sw)
    if d.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{name}: MLP biases (mlp_bias=true) are not supported")
    qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads), intermediate_size=inter,
        head_dim=int(d.get("head_dim") or dim // n_heads), norm_eps=float(d.get("rms_norm_eps") or 1e-6),
        rope_theta=theta, rope_scaling=rope_scaling,
        max_seq_len=int(d.get("max_position_embeddings") or 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        activation=act, activation_param=act_param,
        bos_token_id=d.get("bos_token_id") if not isinstance(d.get("bos_token_id"), list) else d["bos_token_id"][0],
        eos_token_ids=merge_ids(_ids(d.get("eos_token_id")), extra_eos_ids),
        arch=model_type.lower(), name=name,
    )


# transformers parameter name -> canonical name
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv", "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings", "embed_tokens.weight": "tok_embeddings",
    "model.norm.weight": "norm", "norm.weight": "norm", "lm_head.weight": "lm_head",
}


def hf_to_canonical(name: str) -> str | None:
    """Canonical name of a transformers Llama/Mistral/Qwen2 parameter; None for buffers to skip;
    raises for parameters the decoder has no place for."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise ModelFormatError(f"checkpoint tensor {name!r} has no place in a Llama-family decoder "
                           "(o_proj/MLP biases and extra modules are not supported)")


def _folder_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None


def _generation_eos(folder: Path) -> list[int]:
    p = folder / "generation_config.json"
    if not p.is_file():
        return []
    try:
        return _ids(json.loads(p.read_text()).get("eos_token_id"))
    except (json.JSONDecodeError, ValueError, TypeError):
        logger.warning("ignoring unreadable {}", p)
        return []


def safetensors_files(folder: Path) -> dict[str, list[str]]:
    """file name -> tensor names, from the index json when there is one."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text()).get("weight_map", {})
        out: dict[str, list[str]] = {}
        for tname, fname in wm.items():
            out.setdefault(fname, []).append(tname)
        for fname in out:
            if not (folder / fname).is_file():
                raise FileNotFoundError(f"model file not found: {folder / fname} (listed in {index.name}); "
                                        "the sharded checkpoint is incomplete")
        return out
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out[f.name] = list(h.keys())
    return out


class HFFolderSource(ModelSource):
    def __init__(self, folder: Path, tokenizer: Path | None = None):
        folder = Path(folder)
        self.files = safetensors_files(folder)
        if not self.files:
            raise ModelFormatError(f"{folder} has config.json but no *.safetensors weights; re-save the model "
                                   "with save_pretrained(..., safe_serialization=True)")
        raw = _folder_config(folder)
        cfg = hf_config_to_model_config(raw, name=folder.name, extra_eos_ids=_generation_eos(folder))
        # canonical name -> (file, stored name)
        self.locations: dict[str, tuple[str, str]] = {}
        for fname, names in self.files.items():
            for tname in names:
                cname = hf_to_canonical(tname)
                if cname is not None:
                    self.locations[cname] = (fname, tname)
        if not cfg.tie_embeddings and "lm_head" not in self.locations:
            logger.warning("{}: no lm_head.weight and tie_word_embeddings=false; tying lm_head to the embedding",
                           folder)
            cfg = cfg.replace(tie_embeddings=True)
        has_bias = any(n.endswith((".bq", ".bk", ".bv")) for n in self.locations)
        if has_bias != cfg.qkv_bias:
            cfg = cfg.replace(qkv_bias=has_bias)
        super().__init__(folder, cfg)
        self.tokenizer_path = tokenizer
        _ = self.tokenizer  # cheap for folders; merges the tokenizer's EOS ids into the config

    def _load_tokenizer(self) -> Tokenizer:
        from sparsedge.tokenizer import HFTokenizer, find_llama2c_tokenizer, load_tokenizer

        cfg = self.config
        if self.tokenizer_path is not None:
            tok = load_tokenizer(self.tokenizer_path, name=cfg.name, extra_eos_ids=cfg.eos_token_ids)
        elif any((self.path / f).is_file() for f in _TOKENIZER_FILES):
            tok = HFTokenizer.from_pretrained(self.path, name=cfg.name, extra_eos_ids=cfg.eos_token_ids)
        else:
            tb = find_llama2c_tokenizer(self.path, cfg.vocab_size)
            if tb is None:
                raise FileNotFoundError(f"no tokenizer in {self.path} (tokenizer.json / tokenizer.model / tok*.bin); "
                                        "pass tokenizer=PATH")
            tok = load_tokenizer(tb, name=cfg.name)
        cfg.eos_token_ids = merge_ids(cfg.eos_token_ids, tok.eos_token_ids)
        if cfg.bos_token_id is None and tok.bos_token_id is not None:
            cfg.bos_token_id = tok.bos_token_id
        return tok

    def _raw_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        names = [n for n in canonical_order(self.locations) if not (n == "lm_head" and self.config.tie_embeddings)]
        with ExitStack() as stack:
            handles = {}
            for cname in names:
                fname, tname = self.locations[cname]
                if fname not in handles:
                    handles[fname] = stack.enter_context(safe_open(str(self.path / fname), framework="pt"))
                yield cname, handles[fname].get_tensor(tname)

    def describe(self) -> str:
        return f"hf:{self.path}"
