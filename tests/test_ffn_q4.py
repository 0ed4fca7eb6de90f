"""The 4-bit gate x up predictor: packing, the fused CPU kernel against the reference, calibration,
artifacts and the decoder path."""
import argparse

import pytest

from sparsedge import generate
import torch

from sparsedge.calibrate import ffn_cli

from sparsedge.generate import prefill

from sparsedge import ops
from sparsedge.artifact import ArtifactError, save_section
from sparsedge.backends import get_backend
from sparsedge.ffn import attach_predictors, set_per_token
from sparsedge.ffn import q4
from sparsedge.calibrate.ffn import Variant, calibrate_model
from sparsedge.ffn.module import Q4SparseFFN
from sparsedge.testing.synthetic import all_keeping_q4_predictors, random_transformer, tiny_config
from sparsedge.kv_cache import KVCache
from sparsedge.ops.ffn import q4_estimates, q4_scores


BACKEND = get_backend("cpu")  # loads the fused kernels


def _packed(I, d, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wg = torch.randn(I, d, generator=gen) / d ** 0.5
    wu = torch.randn(I, d, generator=gen) / d ** 0.5
    q, scale = q4.pack_gate_up(wg, wu, group)
    return wg, wu, q, scale


def test_packing_layout_and_round_trip():
    G = 4
    w = torch.tensor([[7.0, -7.0, 1.0, 0.0, 3.5, -3.5, 0.5, -0.5]])
    packed, scale = q4.quantize_rows(w, G)
    assert scale.tolist() == [[1.0, 0.5]]
    # group 0 = inputs 0..3: byte 0 holds input 0 (low) and input 2 (high), byte 1 inputs 1 and 3; stored +8
    assert packed[0, :2].tolist() == [(7 + 8) | ((1 + 8) << 4), (-7 + 8) | ((0 + 8) << 4)]
    assert torch.equal(q4.dequantize_rows(packed, scale), w)
    wg, _, q, s = _packed(64, 96, 32)
    err = (q4.dequantize_rows(q[:, 0], s[:, 0]) - wg).abs()
    assert bool((err <= s[:, 0].repeat_interleave(32, 1) / 2 + 1e-7).all())  # round to nearest


def _correlated_inputs(n, basis, gen):
    """Inputs like a transformer's: a few strong directions (and per-channel scales) plus noise."""
    return torch.randn(n, basis.shape[0], generator=gen) @ basis + 0.05 * torch.randn(n, basis.shape[1], generator=gen)


def test_gptq_rounding_cuts_the_output_error_on_unseen_inputs():
    """Output-aware rounding: fitted on X^T X of one sample, the estimates x . w^ on a second sample are
    markedly closer to x . w than with round-to-nearest; same format (levels in [-8, 7], one scale a group)."""
    gen = torch.Generator().manual_seed(0)
    I, d, G = 128, 128, 32
    w = torch.randn(I, d, generator=gen) / d ** 0.5
    basis = torch.randn(8, d, generator=gen) * torch.linspace(0.2, 3.0, d)
    fit, held = _correlated_inputs(2048, basis, gen), _correlated_inputs(2048, basis, gen)
    nearest = q4.dequantize_rows(*q4.quantize_rows(w, G))
    packed, scale = q4.quantize_rows(w, G, fit.double().T @ fit.double())
    gptq = q4.dequantize_rows(packed, scale)
    err = {k: float((held @ (v - w).T).norm()) for k, v in (("nearest", nearest), ("gptq", gptq))}
    assert err["gptq"] < 0.6 * err["nearest"], err
    levels, sc = q4.gptq_round(w, fit.double().T @ fit.double(), G)
    assert levels.min() >= -8 and levels.max() <= 7 and torch.equal(levels, levels.round())
    torch.testing.assert_close(gptq, (levels * sc.repeat_interleave(G, 1)).float())


@pytest.mark.parametrize("xtx", ["identity", "zeros"])
def test_gptq_rounding_is_nearest_when_inputs_are_uncorrelated(xtx):
    """With H = c I no input can absorb another's error, so the output-aware rounding is round-to-nearest
    exactly; an all-zero X^T X (no data) is damped into that case instead of failing."""
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    h = torch.eye(64, dtype=torch.float64) * 3.0 if xtx == "identity" else torch.zeros(64, 64, dtype=torch.float64)
    for a, b in zip(q4.quantize_rows(w, 16, h), q4.quantize_rows(w, 16)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="X\\^T X is"):
        q4.gptq_round(w, torch.eye(32, dtype=torch.float64), 16)


def test_estimates_track_the_exact_projections():
    wg, wu, q, scale = _packed(256, 128, 64)
    x = torch.randn(16, 128)
    g, u = q4_estimates(x, q, scale)
    for est, exact in ((g, x @ wg.T), (u, x @ wu.T)):
        assert float((est - exact).norm() / exact.norm()) < 0.15
        assert float(torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1]) > 0.99


def _same_active_sets(a, b):
    (ia, ca), (ib, cb) = a, b
    return torch.equal(ca, cb) and all(torch.equal(ia[t, :ca[t]], ib[t, :cb[t]]) for t in range(len(ca)))


@pytest.mark.parametrize("I,d,G", [(300, 128, 64), (257, 96, 32), (1536, 576, 64), (100, 64, 2), (64, 256, 128),
                                   (40, 640, 128)])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu", "drelu", "relu2", "fatrelu"])
def test_fused_kernel_matches_reference(I, d, G, act):
    assert ops.has_fused("ffn_predict_q4", "cpu")
    _, _, q, scale = _packed(I, d, G, seed=I)
    x = torch.randn(5, d)
    x[1, :G] = 0.0  # a group with max|x| = 0
    param = 0.1 if act == "fatrelu" else 0.0
    thresh = q4_scores(torch.randn(64, d), q, scale, act, param).quantile(0.5, dim=0)
    got = torch.ops.sparsedge.ffn_predict_q4(x, q, scale, thresh, act, param)
    want = ops.reference("ffn_predict_q4")(x, q, scale, thresh, act, param)
    assert _same_active_sets(got, want)
    assert 0 < int(got[1].sum()) < 5 * I  # a real mix of active and inactive neurons


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_kernel_dtypes_densities_and_threads(dtype):
    I, d = 512, 192
    _, _, q, scale = _packed(I, d, 64, seed=1)
    x = torch.randn(3, d).to(dtype)
    ref = ops.reference("ffn_predict_q4")
    for thresh in (torch.full((I,), -1.0), torch.full((I,), float("inf")),
                   q4_scores(x, q, scale, "silu", 0.0).quantile(0.7, dim=0)):
        got = torch.ops.sparsedge.ffn_predict_q4(x, q, scale, thresh, "silu", 0.0)
        assert _same_active_sets(got, ref(x, q, scale, thresh, "silu", 0.0))
    assert torch.equal(torch.ops.sparsedge.ffn_predict_q4(x, q, scale, torch.full((I,), -1.0), "silu", 0.0)[1],
                       torch.full((3,), I, dtype=torch.int32))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.sparsedge.ffn_predict_q4(x, q, scale, thresh, "silu", 0.0)
    finally:
        torch.set_num_threads(n)
    assert _same_active_sets(one, torch.ops.sparsedge.ffn_predict_q4(x, q, scale, thresh, "silu", 0.0))


def test_kernel_and_validate_refuse_bad_shapes():
    _, _, q, scale = _packed(32, 64, 32)
    x, thresh = torch.randn(1, 64), torch.zeros(32)
    with pytest.raises(RuntimeError, match="q must be uint8"):
        torch.ops.sparsedge.ffn_predict_q4(x, q.to(torch.int32), scale, thresh, "silu", 0.0)
    with pytest.raises(RuntimeError, match="scale must be"):
        torch.ops.sparsedge.ffn_predict_q4(x, q, scale[:, :, :1].repeat(1, 1, 3), thresh, "silu", 0.0)
    with pytest.raises(ValueError, match="expected uint8"):
        q4.validate(q[:, :, :16], scale, thresh, 32, 64)
    with pytest.raises(ValueError, match="thresh"):
        q4.validate(q, scale, thresh[:5], 32, 64)
    with pytest.raises(ValueError, match="must be even and divide"):
        q4.quantize_rows(torch.randn(4, 60), 64)


def greedy(model, prompt, n):
    return generate.greedy(model, prompt, n)[0]


@pytest.mark.parametrize("per_token", [False, True])
def test_all_keeping_q4_predictors_reproduce_dense_greedy(tmp_path, per_token):
    model = random_transformer(tiny_config("silu"), seed=3)
    prompt = [5, 17, 3, 99, 42, 7, 64, 1]
    dense_tokens = greedy(model, prompt, 12)
    save_section(tmp_path / "art", model, "ffn", all_keeping_q4_predictors(model), {"predictor": "q4"})
    attach_predictors(model, tmp_path / "art", BACKEND, per_token=per_token)
    assert all(isinstance(layer.ffn, Q4SparseFFN) for layer in model.layers)
    assert greedy(model, prompt, 12) == dense_tokens
    st = model.layers[0].ffn.stats()
    assert st["ffn_predicted"] == st["ffn_neurons"]


def test_calibrated_q4_predictors_end_to_end(tmp_path):
    from .test_ffn_model import tiny_calibration

    cfg, model, windows, xa, xb = tiny_calibration("silu", 3)
    [(tensors, meta), (_, meta_svd)] = calibrate_model(
        model, xa, xb, [Variant(s=0.8, predictor="q4", group=32), Variant(s=0.8, rank=16)], progress=False)
    assert meta["predictor"] == "q4" and meta["group"] == 32 and meta["tau"] == [0.0] * cfg.n_layers
    for i, m in enumerate(meta["layers"]):
        target = (0.8 - (0.1 if i < 2 else 0.0)) * m["true_sparsity"]  # true sparsity = the tau fraction, 0.5
        assert m["true_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert m["predicted_sparsity"] == pytest.approx(target, abs=0.02)
    # it knows u, so at equal sparsity it keeps more of the true contribution than the gate-only predictor
    assert meta["mean"]["weighted_recall"] > meta_svd["mean"]["weighted_recall"]
    save_section(tmp_path / "art", model, "ffn", tensors, meta)
    attach_predictors(model, tmp_path / "art", BACKEND)
    set_per_token(model, True)
    model.ensure_rope(64)
    with torch.inference_mode():
        prefill(model, windows[1], KVCache.dense(cfg, 64, model.dtype, model.device), all_logits=True)
    f = model.layers[2].ffn
    st = f.stats()
    assert 1 - st["ffn_gate_up_rows"] / st["ffn_neurons"] == pytest.approx(meta["layers"][2]["predicted_sparsity"], abs=0.08)
    assert f.predictor_bytes() == q4.nbytes(cfg.intermediate_size, cfg.dim, 32)
    assert st["weight_bytes"] == (st["sparse_ffn_tokens"] * f.predictor_bytes() + 2 * st["ffn_gate_up_rows"] * cfg.dim * 4
                                  + st["ffn_down_rows"] * cfg.dim * 4)


def test_mismatched_q4_artifact_is_refused(tmp_path):
    model = random_transformer(tiny_config("silu"), seed=5)
    bad = all_keeping_q4_predictors(model)
    bad["layers.2.q"] = bad["layers.2.q"][:, :, :8].contiguous()
    save_section(tmp_path / "art", model, "ffn", bad, {"predictor": "q4"})
    with pytest.raises(ArtifactError, match="layer 2: 4-bit predictor q"):
        attach_predictors(model, tmp_path / "art", BACKEND)
    del bad["layers.2.q"]
    save_section(tmp_path / "art", model, "ffn", bad, {"predictor": "q4"})
    with pytest.raises(ArtifactError, match="lacks"):
        attach_predictors(model, tmp_path / "art", BACKEND)


def test_cli_refuses_svd_options_and_powerinfer_export_with_q4():
    p = argparse.ArgumentParser()
    ffn_cli.add_arguments(p)
    args = p.parse_args(["--predictor", "q4", "--rank", "64"])
    with pytest.raises(ValueError, match="configure the SVD predictor"):
        ffn_cli.variant_from_args(args)
    v = ffn_cli.variant_from_args(p.parse_args(["--predictor", "q4", "--q4-group", "32"]))
    assert (v.predictor, v.group) == ("q4", 32)
    args = p.parse_args(["--predictor", "q4", "--export", "powerinfer", "x"])
    with pytest.raises(SystemExit, match="no 4-bit"):
        ffn_cli.run(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("G", [64, 32])  # 64: the AVX2 path; 32: the scalar one
def test_fused_estimates_are_bitwise_the_reference(dtype, G):
    """relu scores are exact products, so with each threshold set to the reference's own score the kernel must
    call every neuron inactive, and every neuron active one ulp lower: any rounding difference in the x
    quantization (fp16/bf16 inputs hit round-half-even ties) or the group sums would flip decisions."""
    I, d, T = 512, 576, 12
    _, _, q, scale = _packed(I, d, G, seed=7)
    x = torch.randn(T, d).to(dtype)
    ref = q4_scores(x, q, scale, "relu", 0.0)
    for t in range(T):
        at = ref[t]
        below = torch.nextafter(at, torch.full_like(at, -float("inf")))
        for thresh, want in ((at, 0), (below, I)):
            _, count = torch.ops.sparsedge.ffn_predict_q4(x[t:t + 1], q, scale, thresh, "relu", 0.0)
            assert int(count[0]) == want, (t, want)


def test_stories260k_q4_beats_the_gate_predictor(tmp_path, stories_path):
    """Real SiLU checkpoint, through the CLIs' code: at the same s (same per-layer targets) the 4-bit gate x up
    predictor loses less perplexity than the SVD gate predictor, and decode runs the same sparse path."""
    from sparsedge import evaluate
    from sparsedge.testing.data import TINYSTORIES_SAMPLE, data_path

    from .test_ffn_model import calibrate_parser

    text = data_path(TINYSTORIES_SAMPLE)
    base = ["--model", str(stories_path), "--text", str(text), "--tokens", "2048", "--seq-len", "256",
            "--dtype", "float32", "--text-start", "0.5", "--s", "0.8", "--quantile-points", "64"]
    p = calibrate_parser()
    summary = ffn_cli.run(p.parse_args(base + ["--out", str(tmp_path / "q4"), "--predictor", "q4", "--q4-group", "32"]))
    assert summary["predictor"] == "q4" and summary["group"] == 32
    ffn_cli.run(p.parse_args(base + ["--out", str(tmp_path / "svd"), "--predictor", "svd"]))
    q = argparse.ArgumentParser()
    evaluate.add_ppl_arguments(q)
    ev = ["--model", str(stories_path), "--text", str(text), "--max-tokens", "512", "--seq-len", "256"]
    dense = evaluate.run_ppl(q.parse_args(ev))["ppl"]
    r4 = evaluate.run_ppl(q.parse_args(ev + ["--predictors", str(tmp_path / "q4")]))
    rs = evaluate.run_ppl(q.parse_args(ev + ["--predictors", str(tmp_path / "svd")]))
    assert r4["ffn_sparsity"] > 0.3 and rs["ffn_sparsity"] > 0.3
    assert r4["ppl"] / dense - 1 < 0.5 * (rs["ppl"] / dense - 1)
    dec = evaluate.run_ppl(q.parse_args(ev + ["--predictors", str(tmp_path / "q4"), "--decode"]))
    # same sparse path; prefill and decode attention round differently, and a last-bit change of x can move
    # an int8 group value and so flip a neuron that sits on its threshold: a few flips, not a different path
    assert dec["ppl"] == pytest.approx(r4["ppl"], rel=3e-3)
