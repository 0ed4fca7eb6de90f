"""transformers checkpoint folders (config.json + *.safetensors, sharded or not), and the
translation of a transformers config (dict) into a ModelConfig, shared with the GGUF loader.

BitNet b1.58 folders quantized by transformers (quantization_config quant_method "bitnet") load with their projections
as TernaryWeight (sparsedge.quant.ternary), run by sparsedge::bitlinear with transformers' arithmetic:
  linear_class "bitlinear"                 packed uint8 weight + weight_scale (BitLinear divides by it)
  "autobitlinear", quantization_mode       offline: ternary weight (packed, or as floats) + weight_scale (a multiplier);
                                           online: float weights, quantized here as its WeightQuant does each forward
Modules listed in modules_to_not_convert stay float. use_rms_norm, a ternary LM head and (autobitlinear offline)
biases, which it scales with the output, are refused."""
from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
from loguru import logger

from sparsedge.config import ModelConfig, UnsupportedArchitectureError, check_architecture
from sparsedge.quant.ternary import TernaryWeight, absmean_quantize, unpack_transformers
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


def _rope(d: dict, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(theta, rope_scaling) of the (full-attention) layers, from either config style (rope_theta + rope_scaling,
    or rope_parameters, possibly per attention type). Scaling types other than default / linear / llama3 are
    refused: RoPE is never run approximately."""
    params = d.get("rope_parameters") or {}
    if params and not any(k in params for k in ("rope_theta", "rope_type", "type")):
        # per-attention-type parameters ({"full_attention": {...}}): take the full-attention ones
        params = params.get("full_attention") or next(iter(params.values()), {}) or {}
    scaling = d.get("rope_scaling") or {}
    theta = d.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or default_theta
    src = scaling or params
    rtype = src.get("rope_type") or src.get("type") or "default"
    if rtype == "default":
        return float(theta), None
    if rtype == "linear":
        if "factor" not in src:
            raise ModelFormatError("linear RoPE scaling without 'factor' in the config")
        return float(theta), {"rope_type": "linear", "factor": float(src["factor"])}
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
    raise ModelFormatError(f"RoPE scaling type {rtype!r} is not supported (supported: default, linear, llama3)")


# model_type -> the architecture name sparsedge uses (transformers' text-only Gemma 3 is "gemma3_text")
_MODEL_TYPES = {"gemma3_text": "gemma3"}
# config keys that mean mixture-of-experts FFN layers (Mixtral, Qwen2/3-MoE, DeepSeek, ...)
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def _refuse_unimplemented(d: dict, model_type: str, name: str) -> None:
    """Options of a config the decoder does not implement, refused by name before anything runs."""
    moe = {k: d[k] for k in _MOE_KEYS if d.get(k)}
    if moe:
        raise UnsupportedArchitectureError(f"{name}: mixture-of-experts FFN layers ({', '.join(f'{k}={v}' for k, v in moe.items())}) "
                                           "are not implemented; sparsedge runs dense FFN layers only")
    check_architecture(model_type)
    qc = d.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        if method == "bitnet":
            bitnet_quantization(d, model_type, name)
        else:
            raise UnsupportedArchitectureError(
                f"{name}: quantization_config (quant_method={method!r}) is not implemented for transformers folders; "
                "load a float checkpoint, or a GGUF file")
    if d.get("attn_logit_softcapping"):
        raise UnsupportedArchitectureError(f"{name}: attention logit softcapping (attn_logit_softcapping="
                                           f"{d['attn_logit_softcapping']}) is not implemented")
    if d.get("use_bidirectional_attention"):
        raise UnsupportedArchitectureError(f"{name}: bidirectional attention (use_bidirectional_attention=true) is "
                                           "not implemented; sparsedge runs causal decoders")
    if d.get("layer_types") and model_type not in ("mistral", "phi3"):
        other = sorted(set(d["layer_types"]) - {"full_attention", "sliding_attention"})
        if other:
            raise UnsupportedArchitectureError(f"{name}: layer types {other} are not implemented "
                                               "(full_attention and sliding_attention are)")


class BitNetQuant(NamedTuple):
    """A BitNet quantization_config as transformers applies it (transformers.integrations.bitnet)."""
    linear_class: str  # "bitlinear" | "autobitlinear"
    mode: str  # "offline" | "online" (AutoBitLinear only)
    skip: tuple[str, ...] | None  # modules_to_not_convert (None: transformers' default, the LM head)

    def converts(self, module: str) -> bool:
        """Whether transformers replaces the nn.Linear `module` (e.g. "model.layers.0.self_attn.q_proj"): its
        should_convert_module, a pattern matching from the start up to a module boundary, as a regex, or as a suffix."""
        if self.skip is None:
            return module != "lm_head"
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in self.skip)

    def weight(self, tname: str, t: torch.Tensor, weight_scale: torch.Tensor | None):
        """The stored projection `tname` (and its weight_scale) as the decoder runs it: a TernaryWeight, or the
        float tensor of a module transformers leaves unconverted."""
        if not self.converts(tname.removesuffix(".weight")):
            if t.dtype == torch.uint8 or weight_scale is not None:
                raise ModelFormatError(f"{tname} is stored quantized, but modules_to_not_convert={list(self.skip)} "
                                       "keeps its module a float nn.Linear; the checkpoint is inconsistent")
            return t
        if self.linear_class == "bitlinear":
            if t.dtype != torch.uint8 or weight_scale is None:
                raise ModelFormatError(f"{tname}: a BitLinear weight is packed uint8 [N/4, K] with a weight_scale, "
                                       f"got {t.dtype} {list(t.shape)}" + ("" if weight_scale is not None else
                                                                           " and no weight_scale"))
            return TernaryWeight.from_transformers(t, _one_scale(tname, weight_scale))
        if self.mode == "online":  # AutoBitLinear's WeightQuant, once here instead of every forward
            if not t.is_floating_point() or weight_scale is not None:
                raise ModelFormatError(f"{tname}: AutoBitLinear online quantization reads float weights without a "
                                       f"weight_scale, got {t.dtype} {list(t.shape)}")
            w, s = absmean_quantize(t)
            return TernaryWeight.from_ternary(w, s)
        if weight_scale is None:
            raise ModelFormatError(f"{tname}: an offline AutoBitLinear weight needs its weight_scale")
        w = unpack_transformers(t) if t.dtype == torch.uint8 else t
        if t.dtype != torch.uint8 and not bool(((w == -1) | (w == 0) | (w == 1)).all()):
            raise UnsupportedArchitectureError(f"{tname}: offline AutoBitLinear weights that are not ternary "
                                               "(-1/0/+1) are not implemented; BitLinear's integer products need them")
        return TernaryWeight.from_ternary(w.to(torch.int8), 1.0 / _one_scale(tname, weight_scale))


def _one_scale(tname: str, weight_scale: torch.Tensor) -> torch.Tensor:
    if weight_scale.numel() != 1:
        raise ModelFormatError(f"{tname}: weight_scale has shape {list(weight_scale.shape)}; BitLinear's is one "
                               "number per projection")
    return weight_scale.float().reshape(1)


def bitnet_quantization(d: dict, model_type: str, name: str) -> BitNetQuant | None:
    """The BitNet quantization of a config (None without one); UnsupportedArchitectureError for what the decoder does
    not implement, naming it."""
    qc = d.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitnet":
        return None
    lc, mode = qc.get("linear_class", "bitlinear"), qc.get("quantization_mode", "offline")
    where = f"{name}: BitNet quantization_config"
    if model_type != "bitnet":
        raise UnsupportedArchitectureError(f"{where} on a {model_type} checkpoint is not implemented (BitNet b1.58's "
                                           "own architecture is)")
    if lc not in ("bitlinear", "autobitlinear") or mode not in ("offline", "online"):
        raise UnsupportedArchitectureError(f"{where}: linear_class={lc!r}, quantization_mode={mode!r} is not one "
                                           "transformers defines (bitlinear / autobitlinear, offline / online)")
    if qc.get("use_rms_norm"):
        raise UnsupportedArchitectureError(f"{where}: use_rms_norm=true (an RMSNorm inside every projection, before "
                                           "its activation quantization) is not implemented")
    if lc == "autobitlinear" and mode == "offline" and d.get("attention_bias"):
        raise UnsupportedArchitectureError(f"{where}: offline AutoBitLinear with attention_bias=true scales the bias "
                                           "with the output (y = (x W + b) * weight_scale), which is not implemented")
    skip = qc.get("modules_to_not_convert")
    q = BitNetQuant(lc, mode, None if skip is None else tuple(skip))
    if q.converts("lm_head"):
        raise UnsupportedArchitectureError(f"{where}: modules_to_not_convert={skip} leaves lm_head to be quantized; a "
                                           "ternary LM head is not implemented")
    return q


def _sliding(d: dict, model_type: str, n_layers: int, max_pos: int) -> tuple[int, list[int]]:
    """(window, sliding layer indices) as transformers sets them up for each architecture."""
    sw = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        sw = None
    if model_type in ("llama", "smollm2", "bitnet") or not sw:
        return 0, []  # these attend to everything whatever a stray sliding_window key says
    sw = int(sw)
    if model_type in ("mistral", "phi3"):  # one window on every layer (transformers ignores layer_types there)
        return sw, list(range(n_layers))
    types = d.get("layer_types")
    if types is None:
        if model_type == "gemma3":
            pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        else:  # qwen2 / qwen3: the layers from max_window_layers on
            first = int(d.get("max_window_layers") or 0)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers:
        raise ModelFormatError(f"layer_types lists {len(types)} layers, the config has {n_layers}")
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return (sw, layers) if layers else (0, [])


def _local_rope_theta(d: dict) -> float:
    """RoPE base of Gemma 3's sliding layers (rope_parameters["sliding_attention"], or rope_local_base_freq)."""
    params = (d.get("rope_parameters") or {}).get("sliding_attention") or {}
    rtype = params.get("rope_type") or params.get("type") or "default"
    if rtype != "default":
        raise ModelFormatError(f"RoPE scaling type {rtype!r} on the sliding-window layers is not supported")
    return float(params.get("rope_theta") or d.get("rope_local_base_freq") or 10000.0)


def hf_config_to_model_config(d: dict, name: str, extra_eos_ids: Iterable[int] = ()) -> ModelConfig:
    """A transformers config (as a dict: config.json, or PretrainedConfig.to_dict()) -> ModelConfig.
    Raises UnsupportedArchitectureError for other model types and for options the decoder does not implement
    (mixture-of-experts layers, attention softcapping, quantization_config, ...), naming them."""
    if d.get("vision_config") is not None or d.get("audio_config") is not None:
        raise UnsupportedArchitectureError(f"{name}: a multimodal checkpoint ({d.get('model_type')}) is not supported; "
                                           "load its text-only model (e.g. gemma3_text)")
    if "text_config" in d and "hidden_size" not in d:
        d = {**d["text_config"], "model_type": d["text_config"].get("model_type", d.get("model_type"))}
    model_type = d.get("model_type")
    if not model_type:
        raise ModelFormatError(f"config of {name} has no model_type; cannot tell its architecture")
    model_type = _MODEL_TYPES.get(model_type, model_type)
    _refuse_unimplemented(d, model_type, name)
    try:
        dim = int(d["hidden_size"])
        n_heads = int(d["num_attention_heads"])
        n_layers = int(d["num_hidden_layers"])
        inter = int(d["intermediate_size"])
        vocab = int(d["vocab_size"])
    except KeyError as exc:
        raise ModelFormatError(f"config of {name} lacks {exc.args[0]!r}") from None
    act_name = (d.get("hidden_act") or d.get("hidden_activation")
                or ("gelu_pytorch_tanh" if model_type == "gemma3" else "relu2" if model_type == "bitnet" else "silu"))
    if act_name not in _ACTIVATIONS:
        raise ModelFormatError(f"FFN activation {act_name!r} of {name} is not supported "
                               f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
    act = _ACTIVATIONS[act_name]
    act_param = 0.0
    for k in _THRESHOLD_KEYS:
        if d.get(k) is not None:
            act_param = float(d[k])
            break
    gemma = model_type == "gemma3"
    theta, rope_scaling = _rope(d, 1_000_000.0 if gemma else 10000.0)
    max_pos = int(d.get("max_position_embeddings") or 2048)
    window, sliding_layers = _sliding(d, model_type, n_layers, max_pos)
    if d.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{name}: MLP biases (mlp_bias=true) are not supported")
    qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
    head_dim = int(d.get("head_dim") or dim // n_heads)
    prf = d.get("partial_rotary_factor") or (d.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0
    rotary_dim = int(head_dim * float(prf))
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ModelFormatError(f"{name}: partial_rotary_factor={prf} gives {rotary_dim} rotary channels of "
                               f"{head_dim}; an even count is needed")
    extra = dict(
        qk_norm=model_type in ("qwen3", "gemma3"), post_norms=gemma, sub_norms=model_type == "bitnet",
        embed_scale=float(dim ** 0.5) if gemma else 0.0,
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256) if gemma else 0.0,
        rotary_dim=rotary_dim if rotary_dim < head_dim else 0,
        sliding_window=window, sliding_layers=sliding_layers,
        rope_local_theta=_local_rope_theta(d) if gemma and sliding_layers else 0.0,
        final_logit_softcap=float(d.get("final_logit_softcapping") or 0.0),
    )
    return ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads), intermediate_size=inter,
        head_dim=head_dim, norm_eps=float(d.get("rms_norm_eps") or 1e-6),
        rope_theta=theta, rope_scaling=rope_scaling,
        max_seq_len=max_pos,
        tie_embeddings=bool(d.get("tie_word_embeddings", gemma)), qkv_bias=qkv_bias,
        activation=act, activation_param=act_param,
        bos_token_id=d.get("bos_token_id") if not isinstance(d.get("bos_token_id"), list) else d["bos_token_id"][0],
        eos_token_ids=merge_ids(_ids(d.get("eos_token_id")), extra_eos_ids),
        arch=model_type.lower(), name=name, **extra,
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
_LAYER_MAP.update({
    "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm",  # Qwen3, Gemma 3
    "self_attn.attn_sub_norm.weight": "attn_sub_norm", "mlp.ffn_sub_norm.weight": "ffn_sub_norm",  # BitNet
    "self_attn.qkv_proj.weight": "wqkv", "mlp.gate_up_proj.weight": "w_gate_up",  # Phi-3: fused, split on load
})
# Gemma 3 names its four norms after their place: input (attn_norm), post-attention, pre- and post-FFN
_GEMMA_LAYER_MAP = {**_LAYER_MAP, "post_attention_layernorm.weight": "post_attn_norm",
                    "pre_feedforward_layernorm.weight": "ffn_norm", "post_feedforward_layernorm.weight": "post_ffn_norm"}
_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings", "embed_tokens.weight": "tok_embeddings",
    "model.norm.weight": "norm", "norm.weight": "norm", "lm_head.weight": "lm_head",
}
_FUSED = ("wqkv", "w_gate_up")  # stored fused (Phi-3); HFFolderSource yields their row blocks under canonical names


def hf_to_canonical(name: str, arch: str = "llama") -> str | None:
    """Canonical name of a transformers parameter of `arch`; None for buffers to skip; raises for parameters
    the decoder has no place for. Phi-3's fused projections map to the pseudo-names layers.{i}.wqkv / w_gate_up."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    layer_map = _GEMMA_LAYER_MAP if arch == "gemma3" else _LAYER_MAP
    if m and m.group(2) in layer_map:
        return f"layers.{m.group(1)}.{layer_map[m.group(2)]}"
    raise ModelFormatError(f"checkpoint tensor {name!r} has no place in a {arch} decoder "
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


_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, data_offsets), checked against the
    file's size; ModelFormatError naming the file when it is truncated or not a safetensors file."""
    path = Path(path)
    redo = "re-download or re-save the checkpoint (save_pretrained(..., safe_serialization=True))"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path} is not a safetensors file ({size} bytes, too short for a header); {redo}")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise ModelFormatError(f"{path} is corrupt or truncated: its header claims {n} bytes but the file holds "
                                   f"{size}; {redo}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            if not 0 <= int(lo) <= int(hi):
                raise ValueError(f"bad data offsets of {name!r}")
            end = max(end, int(hi))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{path} is corrupt: its header is not a safetensors header ({exc}); {redo}") from None
    if 8 + n + end > size:
        raise ModelFormatError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file holds {size}; "
                               f"{redo}")
    return header


def safetensors_files(folder: Path) -> dict[str, list[str]]:
    """file name -> tensor names, from the index json when there is one. Every file's header is read and
    checked here, when the folder is opened, so a corrupt or truncated file is named before any weight loads."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ModelFormatError(f"{index} is not a valid safetensors index ({exc}); re-download or re-save "
                                   "the checkpoint") from None
        out: dict[str, list[str]] = {}
        for tname, fname in wm.items():
            out.setdefault(fname, []).append(tname)
        for fname, names in out.items():
            if not (folder / fname).is_file():
                raise FileNotFoundError(f"model file not found: {folder / fname} (listed in {index.name}); "
                                        "the sharded checkpoint is incomplete")
            missing = set(names) - set(read_safetensors_header(folder / fname))
            if missing:
                raise ModelFormatError(f"{folder / fname} lacks {len(missing)} tensors that {index.name} puts "
                                       f"there (e.g. {sorted(missing)[0]!r}); the checkpoint is inconsistent: "
                                       "re-download or re-save it")
        return out
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out[f.name] = sorted(k for k in read_safetensors_header(f) if k != "__metadata__")
    return out


def _fused_rows(cfg: ModelConfig, key: str) -> dict[str, tuple[int, int]]:
    """Row blocks of Phi-3's fused projections: qkv_proj = [q; k; v], gate_up_proj = [gate; up]."""
    if key == "wqkv":
        q, kv = cfg.q_size, cfg.kv_size
        return {"wq": (0, q), "wk": (q, q + kv), "wv": (q + kv, q + 2 * kv)}
    inter = cfg.intermediate_size
    return {"w_gate": (0, inter), "w_up": (inter, 2 * inter)}


_PROJECTIONS = frozenset(("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
_NORMS = frozenset(("attn_norm", "ffn_norm", "norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"))


def partial_rotary_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Channel order of one head that puts partial rotary in the decoder's rotate-half form (sparsedge.loading.base):
    canonical channel j is transformers' channel order[j]; each half starts with its rotated half."""
    R, D = rotary_dim, head_dim
    P = (D - R) // 2
    return torch.cat([torch.arange(0, R // 2), torch.arange(R, R + P), torch.arange(R // 2, R),
                      torch.arange(R + P, D)])


def _to_canonical(cfg: ModelConfig, key: str, t: torch.Tensor) -> torch.Tensor:
    """A transformers tensor in the canonical convention: Gemma's RMSNorm weights w as the factor 1 + w (fp32);
    with partial rotary, the q/k rows (and q/k norm weights) of each head reordered."""
    if cfg.arch == "gemma3" and key in _NORMS:
        t = t.float() + 1.0
    if cfg.rotary_dim and key in ("wq", "wk", "bq", "bk", "q_norm", "k_norm"):
        order = partial_rotary_order(cfg.head_dim, cfg.rotary_dim)
        D = cfg.head_dim
        t = t.reshape(-1, D, *t.shape[1:])[:, order].reshape(t.shape)
    return t


class HFFolderSource(ModelSource):
    def __init__(self, folder: Path, tokenizer: Path | None = None):
        folder = Path(folder)
        self.files = safetensors_files(folder)
        if not self.files:
            raise ModelFormatError(f"{folder} has config.json but no *.safetensors weights; re-save the model "
                                   "with save_pretrained(..., safe_serialization=True)")
        raw = _folder_config(folder)
        cfg = hf_config_to_model_config(raw, name=folder.name, extra_eos_ids=_generation_eos(folder))
        self.bitnet = bitnet_quantization(raw, cfg.arch, folder.name)
        # canonical name -> (file, stored name), or (file, stored name, (first row, end row)) for a block of a fused one
        self.locations: dict[str, tuple] = {}
        self.weight_scales: dict[str, tuple[str, str]] = {}  # BitNet: stored projection name -> its weight_scale
        for fname, names in self.files.items():
            for tname in names:
                if self.bitnet is not None and tname.endswith(".weight_scale"):
                    self.weight_scales[tname.removesuffix("_scale")] = (fname, tname)
                    continue
                cname = hf_to_canonical(tname, cfg.arch)
                if cname is None:
                    continue
                prefix, _, key = cname.rpartition(".")
                if key in _FUSED:
                    for part, rows in _fused_rows(cfg, key).items():
                        self.locations[f"{prefix}.{part}"] = (fname, tname, rows)
                else:
                    self.locations[cname] = (fname, tname)
        stray = set(self.weight_scales) - {loc[1] for loc in self.locations.values()}
        if stray:
            raise ModelFormatError(f"{folder}: weight_scale tensors without their weight ({sorted(stray)[:3]}); the "
                                   "checkpoint is incomplete")
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

    def _raw_tensors(self) -> Iterator[tuple[str, torch.Tensor | TernaryWeight]]:
        from safetensors import safe_open

        names = [n for n in canonical_order(self.locations) if not (n == "lm_head" and self.config.tie_embeddings)]
        with ExitStack() as stack:
            handles = {}
            for cname in names:
                fname, tname, *rows = self.locations[cname]
                if fname not in handles:
                    handles[fname] = stack.enter_context(safe_open(str(self.path / fname), framework="pt"))
                if rows:  # a row block of a fused tensor (Phi-3), read alone
                    t = handles[fname].get_slice(tname)[rows[0][0]:rows[0][1]]
                else:
                    t = handles[fname].get_tensor(tname)
                key = cname.rpartition(".")[2]
                if self.bitnet is not None and key in _PROJECTIONS:
                    ws = None
                    if tname in self.weight_scales:
                        sf, sname = self.weight_scales[tname]
                        if sf not in handles:
                            handles[sf] = stack.enter_context(safe_open(str(self.path / sf), framework="pt"))
                        ws = handles[sf].get_tensor(sname)
                    t = self.bitnet.weight(tname, t, ws)
                yield cname, t if isinstance(t, TernaryWeight) else _to_canonical(self.config, key, t)

    def describe(self) -> str:
        return f"hf:{self.path}"
