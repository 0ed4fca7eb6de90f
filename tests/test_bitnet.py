"""BitNet b1.58 checkpoints quantized by transformers (quantization_config quant_method "bitnet"), run natively: the
ternary projections stay packed (2 bits per weight) and run sparsedge::bitlinear, exact against transformers.

transformers creates the quantized modules only in from_pretrained (its quantizer does not run in from_config), so
each test builds a tiny random BitNetForCausalLM in float, quantizes every decoder projection as the offline
quantizer does (ternary = clamp(round(W / mean|W|), -1, 1)), writes the checkpoint transformers' way (BitLinear:
`pack_weights` bytes + weight_scale = 1 / mean|W|; AutoBitLinear offline: packed or float ternary values + weight_scale
= mean|W|; AutoBitLinear online: the float weights) with its quantization_config, and loads that folder back with
transformers' from_pretrained as the reference. Logits of every prompt position and of 16 decode steps, and the
greedy tokens of transformers' generate, as in tests/test_architectures.py (max |diff| / max |logit| < 2e-4).

The references run transformers' BitLinear code eagerly: its activation_quant / post_quant_process are decorated
with torch.compile, which compiles the same fp32 ops (the logits came out bit-identical when checked) but takes tens
of seconds per shape on this CPU, so it is switched off here (torch._dynamo disable).
"""
from __future__ import annotations

import json

import pytest
import torch

from sparsedge import Session
from sparsedge.config import UnsupportedArchitectureError
from sparsedge.loading import ModelFormatError, hf_config_to_model_config
from sparsedge.quant.qweight import nbytes
from sparsedge.quant.ternary import TernaryWeight, pack, unpack, unpack_transformers
from tests.test_architectures import LLAMA_CFG, SMALL, TOL, check_exact, randomize, save_tokenizer

QTOL = 1e-2  # logits of a model with int8-rounded activations (test_quantized_bitnet_exact says why)

transformers = pytest.importorskip("transformers")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _eager_transformers(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "disable", True)


def save_quantized(folder, linear_class="bitlinear", mode="offline", packed=True, skip=None) -> None:
    """A random float BitNet (SMALL) saved with its decoder projections quantized as transformers' BitNet quantizer
    stores them, plus a tokenizer; modules matching `skip` (modules_to_not_convert) stay float."""
    from safetensors.torch import load_file, save_file
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import pack_weights

    m = BitNetForCausalLM(BitNetConfig(**SMALL))
    randomize(m)
    m.save_pretrained(folder)
    sd = load_file(folder / "model.safetensors")
    out = {}
    for k, v in sd.items():
        quantize = k.endswith(tuple(f"{p}.weight" for p in PROJ)) and not any(s in k for s in (skip or ()))
        if not quantize or (linear_class == "autobitlinear" and mode == "online"):
            out[k] = v
            continue
        s = 1.0 / v.float().abs().mean().clamp(min=1e-5)  # transformers' WeightQuant scale
        t = (v.float() * s).round().clamp(-1, 1)
        out[k] = pack_weights(t.clone()) if packed else t
        # BitLinear divides by its weight_scale; AutoBitLinear multiplies by it
        out[k.replace(".weight", ".weight_scale")] = (s if linear_class == "bitlinear" else 1 / s).reshape(1)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    qc = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": mode}
    if skip is not None:
        qc["modules_to_not_convert"] = list(skip)
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    save_tokenizer(folder)


def reference(folder):
    from transformers import BitNetForCausalLM

    return BitNetForCausalLM.from_pretrained(folder).eval()


# ---- exact against transformers ---------------------------------------------------------------------------
@pytest.mark.parametrize("linear_class,mode,packed,skip", [
    ("bitlinear", "offline", True, None),
    ("bitlinear", "offline", True, ["lm_head", "model.layers.1.mlp"]),  # one FFN stays float
    ("autobitlinear", "offline", True, None),
    ("autobitlinear", "offline", False, None),  # ternary values stored as floats
    ("autobitlinear", "online", False, None),  # float weights, quantized on every forward by transformers
], ids=["bitlinear", "bitlinear-skip", "auto-offline-packed", "auto-offline-float", "auto-online"])
def test_quantized_bitnet_exact(tmp_path, linear_class, mode, packed, skip):
    save_quantized(tmp_path, linear_class, mode, packed, skip)
    ref = reference(tmp_path)
    layer = ref.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("BitLinear" if linear_class == "bitlinear" else "AutoBitLinear")
    s = Session.load(tmp_path, dtype="float32", backend="cpu")
    cfg = s.model.config
    assert cfg.arch == "bitnet" and cfg.sub_norms and s.model._plain
    for i, layer in enumerate(s.model.layers):
        att, ffn = layer.attention, layer.ffn
        assert isinstance(att.wqkv, TernaryWeight) and isinstance(att.wo, TernaryWeight)
        float_ffn = skip is not None and i == 1
        assert isinstance(ffn.w_gate_up, torch.Tensor if float_ffn else TernaryWeight)
        assert isinstance(ffn.w_down, type(None) if float_ffn else TernaryWeight)
    # what a step reads of a projection: 2 bits per weight and one fp32 scale per row
    q, kv, d = cfg.q_size, cfg.kv_size, cfg.dim
    assert nbytes(s.model.layers[0].attention.wqkv) == (q + 2 * kv) * d // 4 + 4 * (q + 2 * kv)
    # BitLinear rounds each token's activations to int8: where a value lies within ~1e-7 of a rounding tie, the fp32
    # summation order (ours vs torch's, and between SIMD widths) decides the integer, and one flipped integer moves
    # the logits of that position and, through its K/V, of every later one by ~1e-3 (7.5e-3 seen with one FFN
    # float, on an AVX2-only Zen 3). Float weights instead of the int8 rounding miss by 3e-2 (the test below).
    check_exact(s, ref, tol=QTOL)


def test_the_comparison_sees_the_activation_rounding(tmp_path):
    """The same ternary weights run as float weights (W / scale, x not rounded to int8) miss transformers' logits
    by more than twice the tolerance of the exactness test above: it can fail."""
    from sparsedge.generate import new_cache, prefill

    save_quantized(tmp_path)
    ref = reference(tmp_path)
    s = Session.load(tmp_path, dtype="float32", backend="cpu")
    ids = list(range(3, 23))
    with torch.inference_mode():
        exact = prefill(s.model, ids, new_cache(s.model, 32), all_logits=True)
        for layer in s.model.layers:
            layer.attention.wqkv = layer.attention.wqkv.dequantize()
            layer.attention.wo = layer.attention.wo.dequantize()
            layer.ffn.w_gate_up = layer.ffn.w_gate_up.dequantize()
            layer.ffn.w_down_t, layer.ffn.w_down = layer.ffn.w_down.dequantize().t().contiguous(), None
        floats = prefill(s.model, ids, new_cache(s.model, 32), all_logits=True)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    scale = want.abs().max()
    assert (exact - want).abs().max() / scale < TOL
    assert (floats - want).abs().max() / scale > 2 * QTOL  # 3.0e-2 here


@pytest.mark.parametrize("T,K,N", [(1, 64, 64), (5, 2560, 644), (40, 37, 12)])
def test_bitlinear_is_transformers_bitlinear(T, K, N):
    """One projection: transformers' BitLinear module (fp32) and sparsedge::bitlinear (the CPU kernel and the
    composite reference) on its packed weight, bit for bit; AutoBitLinear (online, from the float weight) to fp32
    rounding (it dequantizes x and W before its float matmul)."""
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights

    from sparsedge import ops
    from sparsedge.backends import get_backend

    get_backend("cpu")  # loads the CPU kernels
    assert ops.has_fused("bitlinear", "cpu")
    g = torch.Generator().manual_seed(T + K + N)
    w = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(T, K, generator=g)
    x[:, :3] *= 8
    t, s = (w * (1.0 / w.abs().mean())).round().clamp(-1, 1), 1.0 / w.abs().mean()
    bl = BitLinear(K, N, bias=False, dtype=torch.float32)
    bl.weight.copy_(pack_weights(t.clone()).to(torch.uint8))
    bl.weight_scale.fill_(float(s))
    auto = AutoBitLinear(K, N, bias=False, online_quant=True)
    with torch.no_grad():
        auto.weight.copy_(w)
        want, want_auto = bl(x), auto(x)
    tw = TernaryWeight.from_transformers(bl.weight, bl.weight_scale)
    assert torch.equal(torch.ops.sparsedge.bitlinear(x, tw.data, tw.scale), want)
    assert torch.equal(ops.reference("bitlinear")(x, tw.data, tw.scale), want)
    assert torch.allclose(torch.ops.sparsedge.bitlinear(x, tw.data, tw.scale), want_auto, rtol=1e-5, atol=1e-5)


def test_ternary_layouts_round_trip():
    """transformers' packing (rows r, r + N/4, ... in one byte row) -> sparsedge's (4 consecutive rows per byte row)."""
    from transformers.integrations.bitnet import pack_weights

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-1, 2, (12, 7), generator=g)
    assert torch.equal(unpack(pack(w)), w.to(torch.int8))
    hf = pack_weights(w.clone().float()).to(torch.uint8)
    assert torch.equal(unpack_transformers(hf), w.to(torch.int8))
    tw = TernaryWeight.from_transformers(hf, torch.tensor([3.0]))
    assert torch.equal(tw.ternary(), w.to(torch.int8)) and torch.equal(tw.scale, torch.full((12,), 3.0))
    assert tw.nbytes == 3 * 7 + 12 * 4
    assert torch.equal(TernaryWeight.cat([tw.rows(slice(0, 4)), tw.rows(slice(4, 12))]).data, tw.data)
    with pytest.raises(ValueError, match="groups of 4"):
        tw.rows(slice(0, 6))


def test_power_of_two_row_scaling_is_exact():
    """Delta attention folds its key scale into W_q / W_k rows (sparsedge.delta.balance): on a ternary weight that is
    the row's scale divided by the factor, and the op's output scales exactly."""
    g = torch.Generator().manual_seed(1)
    tw = TernaryWeight.from_ternary(torch.randint(-1, 2, (8, 40), generator=g), torch.rand(8, generator=g) + 20)
    x = torch.randn(3, 40, generator=g)
    f = torch.tensor([1, 2, 0.5, 4, 1, 0.25, 8, 1.0])
    op = torch.ops.sparsedge.bitlinear
    want = op(x, tw.data, tw.scale) * f
    assert torch.equal(op(x, tw.data, tw.scale_rows_(f).scale), want)
    with pytest.raises(ValueError, match="power-of-two"):
        tw.scale_rows_(torch.full((8,), 3.0))


# ---- what the checkpoint asks for and the decoder does not do: refused, named -------------------------------
BITNET_CFG = {**LLAMA_CFG, "model_type": "bitnet", "hidden_act": "relu2"}


def test_bitnet_quantization_config_is_accepted():
    c = hf_config_to_model_config({**BITNET_CFG, "quantization_config": {"quant_method": "bitnet"}}, "x")
    assert c.arch == "bitnet" and c.sub_norms


@pytest.mark.parametrize("extra,match", [
    ({"quantization_config": {"quant_method": "bitnet", "use_rms_norm": True}}, "use_rms_norm=true"),
    ({"quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": ["model.layers.0"]}},
     "lm_head to be quantized"),
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear"}, "attention_bias": True},
     "scales the bias"),
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "ternary"}}, "linear_class='ternary'"),
    ({"model_type": "llama", "quantization_config": {"quant_method": "bitnet"}}, "on a llama checkpoint"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method='gptq'\\) is not implemented"),
])
def test_bitnet_options_not_implemented_are_refused(extra, match):
    with pytest.raises((ModelFormatError, UnsupportedArchitectureError), match=match):
        hf_config_to_model_config({**BITNET_CFG, **extra}, "x")


def test_inconsistent_checkpoints_are_refused(tmp_path):
    """Float weights where BitLinear stores packed bytes; float non-ternary weights for offline AutoBitLinear."""
    save_quantized(tmp_path / "a", "bitlinear", packed=False)
    with pytest.raises(ModelFormatError, match="packed uint8"):
        Session.load(tmp_path / "a", dtype="float32", backend="cpu")
    save_quantized(tmp_path / "b", "autobitlinear", "online")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["quantization_config"]["quantization_mode"] = "offline"
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="needs its weight_scale"):
        Session.load(tmp_path / "b", dtype="float32", backend="cpu")


def test_ternary_weights_stay_ternary(tmp_path):
    """Requantizing the projections (weights="q8_0") would change the arithmetic: refused. Another dtype keeps them
    packed (only the activations change dtype). The sparse FFN paths refuse them by name."""
    from sparsedge.ffn import attach_tensors
    from sparsedge.ffn.downskip import DownSkipFFN

    save_quantized(tmp_path)
    with pytest.raises(ValueError, match="ternary projection.*weights="):
        Session.load(tmp_path, weights="q8_0", backend="cpu")
    s32 = Session.load(tmp_path, dtype="float32", backend="cpu")
    s16 = Session.load(tmp_path, dtype="bfloat16", backend="cpu")
    assert isinstance(s16.model.layers[0].attention.wqkv, TernaryWeight) and s16.model.dtype == torch.bfloat16
    ids = list(range(3, 15))
    a = s32.generate(ids, max_new_tokens=4, ignore_eos=True)
    b = s16.generate(ids, max_new_tokens=4, ignore_eos=True)
    assert a.token_ids[:2] == b.token_ids[:2]
    cfg = s32.model.config
    keep_all = {k: v for i in range(cfg.n_layers) for k, v in {
        f"layers.{i}.p1": torch.zeros(4, cfg.dim), f"layers.{i}.p2": torch.zeros(cfg.intermediate_size, 4),
        f"layers.{i}.bias": torch.full((cfg.intermediate_size,), 1e30)}.items()}
    with pytest.raises(ValueError, match="ternary weights.*predictor FFN path does not implement"):
        attach_tensors(s32.model, keep_all)
    with pytest.raises(ValueError, match="ternary weights.*down-skip FFN path does not implement"):
        DownSkipFFN(s32.model.layers[0].ffn, torch.zeros(cfg.intermediate_size))
