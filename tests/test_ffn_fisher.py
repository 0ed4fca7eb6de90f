"""The fisher penalty (loss gradients of each FFN output) and the global allocation of sparsity over layers."""
import argparse

import pytest
import torch

from sparsedge.calibrate import collect
from sparsedge.calibrate import ffn_cli
from sparsedge import evaluate

from sparsedge.generate import prefill

from sparsedge.calibrate import ffn as cal
from sparsedge.calibrate.ffn import Variant, calibrate_model
from sparsedge.kv_cache import KVCache

from .test_ffn_model import tiny_calibration


class _Nudged(torch.nn.Module):
    """An FFN whose output at one position gets `delta` added."""

    def __init__(self, ffn, pos, delta):
        super().__init__()
        self.ffn, self.pos, self.delta = ffn, pos, delta

    def forward(self, x):
        y = self.ffn(x).clone()
        y[self.pos] += self.delta.to(y.dtype)
        return y


def _nudged_both_ways(model, layer, pos, delta, measure):
    """(measure() with layer's FFN output at pos nudged by +delta, the same with -delta)."""
    ffn = model.layers[layer].ffn
    out = []
    try:
        for sign in (1, -1):
            model.layers[layer].ffn = _Nudged(ffn, pos, sign * delta)
            out.append(measure())
    finally:
        model.layers[layer].ffn = ffn
    return tuple(out)


def _our_logits(model, ids):
    model.ensure_rope(len(ids))
    cache = KVCache.dense(model.config, len(ids), model.dtype, model.device)
    with torch.inference_mode():
        return prefill(model, ids, cache, all_logits=True).double()


def _our_loss(model, ids):
    logits = _our_logits(model, ids)
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))


def test_loss_grads_predict_our_decoders_loss_change(stories_path):
    """The gradients come from transformers; they must describe OUR decoder: same FFN inputs, and nudging
    layer l's FFN output at one token by delta changes our summed loss by grad . delta (central difference)."""
    from sparsedge.testing.data import TINYSTORIES_SAMPLE, data_path
    from sparsedge.testing.hf_reference import load_transformers_model
    from sparsedge.session import Session

    s = Session.load(stories_path, dtype="float32", backend="cpu", progress=False)
    text = evaluate.read_text(data_path(TINYSTORIES_SAMPLE))
    windows = evaluate.token_windows(s.tokenizer, text, 3 * 128, 128)[:3]
    xa, xb, (ga, gb) = collect.collect_loss_grads(load_transformers_model(stories_path), windows, progress=False)
    ours_a, ours_b = collect.collect_inputs(s.model, windows, progress=False)
    L = s.config.n_layers
    assert len(ga) == len(gb) == L and xa[0].shape == (len(windows[0]) + len(windows[2]), s.config.dim)
    assert ga[0].shape == (xa[0].shape[0], 1, s.config.dim)
    for i in range(L):
        torch.testing.assert_close(xa[i], ours_a[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(xb[i], ours_b[i], atol=1e-4, rtol=1e-4)
    ids = windows[1]  # the B half's only window
    gen = torch.Generator().manual_seed(0)
    for layer, pos in ((1, 20), (L - 1, 70)):
        g = gb[layer][pos, 0]
        delta = 0.05 * torch.randn(s.config.dim, generator=gen)
        up, down = _nudged_both_ways(s.model, layer, pos, delta, lambda: _our_loss(s.model, ids))
        predicted = float(g.double() @ delta.double())
        assert abs(predicted) > 1e-3
        assert (up - down) / 2 == pytest.approx(predicted, rel=0.05, abs=2e-4)


def test_model_label_grads_estimate_the_true_fisher(stories_path):
    """labels="model": the mean over label samples of (grad . delta)^2 estimates delta^T J^T F J delta, the
    true Fisher (F = diag p - p p^T per position, J delta = our decoder's logit change when layer l's FFN
    output at one token is nudged by delta), i.e. the KL a skipped pair adds. 128 samples: ~12% noise."""
    from sparsedge.testing.data import TINYSTORIES_SAMPLE, data_path
    from sparsedge.testing.hf_reference import load_transformers_model
    from sparsedge.session import Session

    s = Session.load(stories_path, dtype="float32", backend="cpu", progress=False)
    windows = evaluate.token_windows(s.tokenizer, evaluate.read_text(data_path(TINYSTORIES_SAMPLE)), 2 * 96, 96)[:2]
    K = 128
    _, _, (_, gb) = collect.collect_loss_grads(load_transformers_model(stories_path), windows, progress=False,
                                           labels="model", samples=K)
    ids, layer, pos = windows[1], 2, 30
    assert gb[layer].shape == (len(ids), K, s.config.dim)
    delta = 0.01 * torch.randn(s.config.dim, generator=torch.Generator().manual_seed(3))
    z = _our_logits(s.model, ids)
    up, down = _nudged_both_ways(s.model, layer, pos, delta, lambda: _our_logits(s.model, ids))
    dz, p = (up - down) / 2, torch.softmax(z, -1)
    fisher = float(((p * dz * dz).sum(-1) - (p * dz).sum(-1) ** 2).sum())
    per_sample = gb[layer][pos].double() @ delta.double()  # [K]: the summed loss's derivative along delta
    assert float(per_sample.square().mean()) == pytest.approx(fisher, rel=0.3)
    assert abs(float(per_sample.mean())) < 4 * fisher ** 0.5 / K ** 0.5  # sampled labels: zero mean
    with pytest.raises(ValueError, match="fisher labels"):
        collect.collect_loss_grads(None, windows, labels="text")


def test_global_allocation_same_total_at_lower_penalty():
    """Global allocation keeps the model-wide target of the per-layer rule and spends it where the summed
    penalty is smaller; the per-layer heap then lands on the targets it chose."""
    cfg, model, windows, xa, xb = tiny_calibration("silu", 3)
    gen = torch.Generator().manual_seed(1)
    # loss gradients that make the layers very unequal: layer 2 matters 10x more than layer 0
    grads = tuple([torch.randn(x.shape, generator=gen) * w for x, w in zip(half, (0.1, 1.0, 1.0))]
                  for half in (xa, xb))
    base = dict(predictor="q4", group=32, s=0.8, penalty="fisher")
    (_, layer_meta), (_, glob_meta) = calibrate_model(
        model, xa, xb, [Variant(**base), Variant(**base, allocation="global")], n_points=64, progress=False,
        grads=grads)
    lm, gm = layer_meta["layers"], glob_meta["layers"]
    total = sum(m["target_sparsity"] for m in lm) / len(lm)
    assert sum(m["calib_sparsity"] for m in gm) / len(gm) == pytest.approx(total, abs=0.02)
    assert sum(m["penalty"] for m in gm) < 0.9 * sum(m["penalty"] for m in lm)
    assert gm[0]["target_sparsity"] > gm[2]["target_sparsity"]
    for m in gm:
        assert m["target_sparsity"] in cal.ALLOCATION_GRID
        assert m["calib_sparsity"] >= m["target_sparsity"] or m["stopped_by_guard"]
    assert glob_meta["target_sparsity"] == [m["target_sparsity"] for m in gm]
    # the q4 thresholds are calibrated on both halves
    assert glob_meta["settings"]["tokens_threshold"] == xa[0].shape[0] + xb[0].shape[0]


def test_fisher_without_grads_and_bad_allocation_are_refused():
    cfg, model, windows, xa, xb = tiny_calibration("silu", 1)
    with pytest.raises(ValueError, match="needs loss gradients"):
        calibrate_model(model, xa, xb, [Variant(predictor="q4", group=32, penalty="fisher")], progress=False)
    with pytest.raises(ValueError, match="unknown allocation"):
        calibrate_model(model, xa, xb, [Variant(allocation="everywhere")], progress=False)
    with pytest.raises(ValueError, match="unknown q4 rounding"):
        calibrate_model(model, xa, xb, [Variant(predictor="q4", group=32, rounding="stochastic")], progress=False)


def test_cli_defaults_pair_the_predictor_with_its_penalty_and_allocation():
    p = argparse.ArgumentParser()
    ffn_cli.add_arguments(p)
    v = ffn_cli.variant_from_args(p.parse_args(["--predictor", "q4"]))
    assert (v.penalty, v.allocation) == ("fisher", "global")
    v = ffn_cli.variant_from_args(p.parse_args([]), "relu")  # auto on a relu model: svd
    assert (v.predictor, v.penalty, v.allocation, v.s) == ("svd", "full", "layer", 0.8)
    v = ffn_cli.variant_from_args(p.parse_args([]), "silu")  # auto on a SiLU model: the 4-bit predictor at 0.85
    assert (v.predictor, v.penalty, v.allocation, v.s) == ("q4", "fisher", "global", 0.85)
    assert ffn_cli.variant_from_args(p.parse_args(["--s", "0.7"]), "gelu_tanh").s == 0.7
    v = ffn_cli.variant_from_args(p.parse_args(["--predictor", "q4", "--penalty", "full"]))
    assert (v.penalty, v.allocation) == ("full", "layer")
    v = ffn_cli.variant_from_args(p.parse_args(["--predictor", "svd", "--penalty", "fisher", "--allocation", "layer"]))
    assert (v.penalty, v.allocation) == ("fisher", "layer")
    assert ffn_cli.variant_from_args(p.parse_args(["--predictor", "q4"])).rounding == "gptq"
    assert ffn_cli.variant_from_args(p.parse_args(["--predictor", "q4", "--q4-rounding", "nearest"])).rounding == "nearest"
    args = p.parse_args(["--predictor", "q4", "--fisher-labels", "model", "--fisher-samples", "4"])
    ffn_cli.variant_from_args(args)
    assert (args.fisher_labels, args.fisher_samples) == ("model", 4)
    for bad in (["--fisher-samples", "2"], ["--fisher-labels", "model", "--fisher-samples", "0"]):
        with pytest.raises(ValueError, match="--fisher-samples"):
            ffn_cli.variant_from_args(p.parse_args(["--predictor", "q4", *bad]))
