"""DownSkipFFN (sparsedge/ffn/downskip.py) and its calibration: W_down rearranged by neuron without changing a
value, all-keeping thresholds reproduce the dense quantized decoder's greedy tokens, thresholds skip what they say,
the artifact runs on quantized and float sessions alike, and what cannot run is refused."""
from __future__ import annotations

import pytest
import torch

from sparsedge.artifact import ArtifactError, save_section
from sparsedge.backends import get_backend
from sparsedge.calibrate import downskip
from sparsedge.ffn.downskip import DownSkipFFN
from sparsedge.ffn.module import attach_predictors, attach_tensors, detach_predictors
from sparsedge.generate import greedy
from sparsedge.loading import open_model
from sparsedge.loading.build import build_transformer
from sparsedge.quant import formats as qf
from sparsedge.quant.down_t import DownT
from sparsedge.quant.qweight import QWeight, dequantized

from .test_gguf_native import INTER, LAYERS, T, hf_weights, write_gguf

CPU = get_backend("cpu")
FFN_Q4 = {"attn_q": T.Q8_0, "attn_k": T.Q8_0, "attn_v": T.Q8_0, "attn_output": T.Q8_0, "ffn_gate": T.Q4_1,
          "ffn_up": T.Q4_1, "ffn_down": T.Q4_1, "token_embd": T.Q8_0}


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    path = tmp_path_factory.mktemp("downskip") / "tiny-q4_1.gguf"
    write_gguf(path, hf_weights(seed=3), FFN_Q4)
    return path


def native(path):
    return build_transformer(open_model(path), CPU, torch.float32, progress=False, mode="native")


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_down_t_is_the_files_values_transposed(qtype):
    g = torch.Generator().manual_seed(0)
    w = QWeight.quantize(torch.randn(96, 160, generator=g), qtype)  # W_down [d=96, I=160]
    dt = DownT.from_qweight(w)
    assert dt.codes.shape == ((160, 48) if qtype != "q8_0" else (160, 96))
    assert torch.equal(dt.dequantize(), w.dequantize().t())
    assert dt.row_bytes() * 160 + dt.block_bytes() * 5 == dt.nbytes


def test_down_t_refuses_other_formats():
    from sparsedge.testing.quant import random_blocks
    w = QWeight(random_blocks("q6_k", 64, 256), "q6_k", 256)
    with pytest.raises(ValueError, match="W_down is stored as q6_k.*q4_0, q4_1, q8_0"):
        DownT.from_qweight(w)


def _thresholds(model, value: float) -> dict:
    return {f"layers.{i}.down_thresh": torch.full((model.config.intermediate_size,), value)
            for i in range(model.config.n_layers)}


def test_all_keeping_thresholds_reproduce_the_dense_quantized_tokens(tiny_q4):
    m = native(tiny_q4)
    assert m.layers[0].ffn.quantized
    ids = list(range(3, 30))
    dense_tokens, dense_logits = greedy(m, ids, 24)
    attach_tensors(m, _thresholds(m, -1.0))
    assert all(isinstance(layer.ffn, DownSkipFFN) and layer.ffn.down_t is not None for layer in m.layers)
    tokens, logits = greedy(m, ids, 24)
    assert tokens == dense_tokens
    # same integer sums per block; only the fp32 order of the block sums differs
    assert torch.allclose(logits, dense_logits, rtol=0, atol=1e-4 * float(dense_logits.abs().max()))
    st = m.layers[0].ffn.stats()
    assert st["ffn_down_rows"] == st["ffn_neurons"] == 24 * INTER


def test_thresholds_skip_what_they_say(tiny_q4, monkeypatch):
    """Every executed step: the op's kept count equals the neurons whose |h| (recomputed from the FFN input)
    passes the threshold, within the few that sit on it (the Python path, where the module's call can be watched)."""
    from sparsedge import fused_step
    monkeypatch.setattr(fused_step, "enabled", False)
    m = native(tiny_q4)
    attach_tensors(m, _thresholds(m, 0.05))
    seen = []
    ffn = m.layers[1].ffn
    orig = ffn.sparse

    def spy(x):
        y, kept = orig(x)
        h = ffn.dense.hidden(x)[1]
        seen.append((int(kept.sum()), int((h.abs() > 0.05).sum())))
        return y, kept
    ffn.sparse = spy
    greedy(m, list(range(3, 20)), 8)
    assert len(seen) == 8 and all(abs(a - b) <= 2 for a, b in seen), seen
    assert 0 < sum(a for a, _ in seen) < 8 * INTER  # some kept, some skipped


def test_calibrated_cuts_hit_their_targets(tiny_q4):
    m = native(tiny_q4)
    windows = [list(range(3, 60)), list(range(10, 70))]
    hist, norms = downskip.collect_histograms(m, windows, progress=False)
    assert int(hist[0].sum()) == sum(map(len, windows)) * INTER
    tensors, meta = downskip.thresholds(hist, norms, 0.5)
    assert meta["targets"][:2] == [0.4, 0.4] and meta["targets"][2:] == [0.5] * (LAYERS - 2)
    # on the calibration tokens themselves the skipped fraction is the target (histogram bins are 0.5% apart)
    from sparsedge.evaluate import perplexity

    from sparsedge.generate import new_cache

    class S:  # the minimal session perplexity() needs
        model = m

        @staticmethod
        def new_cache(n):
            return new_cache(m, n)
    attach_tensors(m, tensors, per_token=True)
    r = perplexity(S, windows, progress=False)
    assert abs(r["ffn_down_sparsity"] - sum(meta["targets"]) / LAYERS) < 0.03, r["ffn_down_sparsity"]
    detach_predictors(m)


def test_artifact_runs_on_quantized_and_float_sessions(tiny_q4, tmp_path):
    """Calibrated on the quantized decoder, loaded into the dequantized one: the same decisions on the same weights
    (h differs only by the int8 rounding of x), so the tokens agree with the quantized session's."""
    q = native(tiny_q4)
    hist, norms = downskip.collect_histograms(q, [list(range(3, 60))], progress=False)
    tensors, meta = downskip.thresholds(hist, norms, 0.3)
    art = save_section(tmp_path / "art", q, "ffn", tensors, meta)
    attach_predictors(q, art, CPU)
    f = build_transformer(open_model(tiny_q4), CPU, torch.float32, progress=False, mode=None)
    attach_predictors(f, art, CPU)
    assert isinstance(f.layers[0].ffn, DownSkipFFN) and f.layers[0].ffn.down_t is None
    ids = list(range(5, 25))
    tq, _ = greedy(q, ids, 12)
    tf, _ = greedy(f, ids, 12)
    assert tq == tf


def test_predictor_artifacts_are_refused_on_quantized_weights(tiny_q4, tmp_path):
    q = native(tiny_q4)
    I, d = q.config.intermediate_size, q.config.dim
    tensors = {}
    for i in range(LAYERS):
        tensors.update({f"layers.{i}.p1": torch.zeros(8, d), f"layers.{i}.p2": torch.zeros(I, 8),
                        f"layers.{i}.bias": torch.zeros(I)})
    art = save_section(tmp_path / "svd", q, "ffn", tensors, {"tau": [0.0] * LAYERS})
    with pytest.raises(ArtifactError, match="run on float weights.*dtype='float32'.*--predictor down"):
        attach_predictors(q, art, CPU)


def test_quantized_layout_the_op_cannot_read_is_refused(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_gguf(path, hf_weights(seed=1), {**FFN_Q4, "ffn_up": T.Q8_0})  # gate q4_1, up q8_0: two formats
    m = native(path)
    with pytest.raises(ValueError, match="gate and up are stored in different formats"):
        attach_tensors(m, _thresholds(m, 0.0))


def test_calibrate_cli_defaults_to_down_on_a_quantized_silu_file(tiny_q4, tmp_path, monkeypatch):
    from sparsedge.calibrate import ffn_cli
    p = __import__("argparse").ArgumentParser()
    ffn_cli.add_arguments(p)
    args = p.parse_args([])
    args.model, args.dtype = str(tiny_q4), None
    assert ffn_cli.session_quantized(args)
    assert ffn_cli.variant_from_args(args, "silu", quantized=True).predictor == "down"
    assert ffn_cli.variant_from_args(args, "silu", quantized=True).s == ffn_cli.DOWN_S
    assert ffn_cli.variant_from_args(args, "silu", quantized=False).predictor == "q4"
    assert ffn_cli.variant_from_args(args, "relu", quantized=True).predictor == "svd"
    args.dtype = "float32"
    assert not ffn_cli.session_quantized(args)


def test_reference_with_every_neuron_kept_is_the_dense_ffn():
    """The op's definition of correct with all neurons kept is qlinear's arithmetic: gate/up and down with their
    inputs rounded to int8 blocks (checked here in float64 against sparsedge.quant.formats.int8_reference)."""
    from sparsedge.ops.qffn import qsparse_ffn_ref
    from sparsedge.activations import activate
    g = torch.Generator().manual_seed(2)
    d, I = 64, 96
    wgu = QWeight.quantize(torch.randn(2 * I, d, generator=g) / 8, "q4_1")
    wd = QWeight.quantize(torch.randn(d, I, generator=g) / 10, "q4_1")
    x = torch.randn(3, d, generator=g)
    dt = DownT.from_qweight(wd)
    y, count = qsparse_ffn_ref(x, wgu.data, "q4_1", *dt.tensors(), torch.full((I,), -1.0), "silu", 0.0)
    gu = qf.int8_reference(x, wgu.data, "q4_1", d)
    h = activate(gu[:, :I], gu[:, I:], "silu", 0.0, 0.0)
    want = qf.int8_reference(h.float(), wd.data, "q4_1", I)
    assert count.tolist() == [I] * 3
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(dequantized(wd), dt.dequantize().t())


def test_kernel_down_sums_at_their_largest():
    """The CPU kernel sums up to 8 neuron pairs of 4-bit down products in int16 before widening (bound 8 x 2 x 15 x
    127 < 2^15). Codes all 15 and every kept h rounding to the same +-127 reach that bound in every group; an
    overflow would be off by multiples of 2^16 products, far outside the reference's tolerance."""
    from sparsedge.ops.qffn import qsparse_ffn_ref
    g = torch.Generator().manual_seed(5)
    d, I = 64, 96
    gate, up = torch.randn(1, d, generator=g), torch.randn(1, d, generator=g)
    wgu = QWeight.quantize(torch.cat([gate.expand(I, d), up.expand(I, d)]) / 8, "q4_1")  # every neuron's h equal
    dt = DownT.from_qweight(QWeight.quantize(torch.randn(d, I, generator=g) / 10, "q4_1"))
    codes = torch.full_like(dt.codes, 0xFF)
    x = torch.randn(2, d, generator=g)
    keep = torch.full((I,), -1.0)
    y, count = torch.ops.sparsedge.qsparse_ffn(x, wgu.data, "q4_1", codes, dt.scale, dt.minv, keep, "silu", 0.0)
    want, _ = qsparse_ffn_ref(x, wgu.data, "q4_1", codes, dt.scale, dt.minv, keep, "silu", 0.0)
    assert count.tolist() == [I, I]
    assert torch.allclose(y, want.float(), rtol=1e-4, atol=1e-4), (y - want).abs().max()


def test_svd_predictors_run_on_quantized_relu_weights(tmp_path):
    """The relu family's SVD predictor on block weights (ffn_predict + qsparse_ffn_rows): an all-keeping predictor
    gives the dense quantized tokens; a cutting one skips rows and still runs."""
    from sparsedge.ffn.module import SparseFFN
    path = tmp_path / "relu.gguf"
    write_gguf(path, hf_weights(seed=4), {**FFN_Q4, "ffn_gate": T.Q4_0, "ffn_up": T.Q4_0, "ffn_down": T.Q4_0})
    m = native(path)
    cfg = m.config
    m.config = cfg.replace(activation="relu")
    for layer in m.layers:
        layer.ffn.activation = "relu"
    ids = list(range(3, 25))
    dense_tokens, dense_logits = greedy(m, ids, 12)
    I, d = cfg.intermediate_size, cfg.dim
    keep_all = {k: v for i in range(LAYERS) for k, v in {f"layers.{i}.p1": torch.zeros(4, d),
                                                         f"layers.{i}.p2": torch.zeros(I, 4),
                                                         f"layers.{i}.bias": torch.ones(I)}.items()}
    attach_tensors(m, keep_all)
    assert isinstance(m.layers[0].ffn, SparseFFN) and m.layers[0].ffn.down_t is not None
    tokens, logits = greedy(m, ids, 12)
    assert tokens == dense_tokens
    assert torch.allclose(logits, dense_logits, rtol=0, atol=1e-4 * float(dense_logits.abs().max()))
    st = m.layers[0].ffn.stats()
    assert 0 < st["ffn_down_rows"] <= st["ffn_gate_up_rows"] == st["ffn_neurons"]  # relu zeros skip down rows
    detach_predictors(m)
    g = torch.Generator().manual_seed(0)
    half = {k: (torch.randn(v.shape, generator=g) if k.endswith(("p1", "p2")) else torch.zeros(I))
            for k, v in keep_all.items()}
    attach_tensors(m, half)
    greedy(m, ids, 4)
    st = m.layers[1].ffn.stats()
    assert 0 < st["ffn_gate_up_rows"] < st["ffn_neurons"]


def test_smollm2_all_keeping_thresholds_match_the_dense_quantized_ffn():
    """The real file. Per layer, on the FFN inputs of a real prompt, down-skip with every row kept equals the dense
    quantized FFN to fp32 summation order (the per-block integer sums are the same; qlinear adds them in 8 lanes,
    the neuron-row kernel per block). End to end the two then differ as any two fp32 orders of this int8-activation
    arithmetic do: a last-bit change can move a later layer's x across an int8 rounding boundary, so logits drift
    by a few percent and greedy tokens can flip at near-ties (on this prompt, step 19 of 32); most of the
    teacher-forced argmaxes agree."""
    from sparsedge import Session
    from sparsedge.generate import decode_one_token, prefill

    from .conftest import smollm2_gguf
    smollm2_gguf()
    s = Session.load("smollm2-135m", backend="cpu", progress=False, max_seq_len=128)
    ids = s.tokenizer.encode("The history of the city begins in the early")
    xs = {}
    with torch.inference_mode():
        prefill(s.model, ids, s.new_cache(64), hidden_hook=lambda i, h: xs.__setitem__(i, h[-2:].clone()))
    dense_ffn = [layer.ffn for layer in s.model.layers]
    dense_tokens, _ = greedy(s.model, ids, 24)

    def forced_argmax():
        cache = s.new_cache(64)
        with torch.inference_mode():
            out = [prefill(s.model, ids, cache)]
            out += [decode_one_token(s.model, t, len(ids) + k, cache) for k, t in enumerate(dense_tokens[:-1])]
        return torch.cat(out).argmax(-1)
    want = forced_argmax()
    attach_tensors(s.model, _thresholds(s.model, -1.0))
    with torch.inference_mode():
        for i, layer in enumerate(s.model.layers):
            for x in xs[i]:
                y_dense = dense_ffn[i](x[None])
                y_skip, kept = layer.ffn.sparse(x[None])
                assert int(kept) == s.model.config.intermediate_size
                assert float((y_skip - y_dense).abs().max()) <= 1e-5 * float(y_dense.abs().max()), i
    assert (forced_argmax() == want).float().mean() >= 0.8


@pytest.mark.parametrize("down_qtype", ["q4_k", "q6_k"])
def test_k_quant_down_runs_the_decision_on_every_row(down_qtype):
    """A Q4_K_M file's W_down (q4_k / q6_k) has no by-neuron layout: the same thresholds run on the masked h
    through qlinear (every row still read, and the statistics say so), never refused and never approximated."""
    from sparsedge.model import linear
    from sparsedge.testing.synthetic import quantize_transformer, random_transformer, tiny_config

    m = quantize_transformer(random_transformer(tiny_config(activation="silu", intermediate_size=256)), "q8_0")
    from sparsedge.testing.quant import random_blocks
    for i, layer in enumerate(m.layers):
        f = layer.ffn
        f.w_down = QWeight(random_blocks(down_qtype, m.config.dim, 256, torch.Generator().manual_seed(i)), down_qtype, 256)
    m.ensure_rope(64)
    ids = list(range(3, 30))
    dense_tokens, dense_logits = greedy(m, ids, 12)
    attach_tensors(m, _thresholds(m, -1.0))
    ffn = m.layers[0].ffn
    assert isinstance(ffn, DownSkipFFN) and ffn.down_t is None and "masked" in repr(ffn)
    tokens, logits = greedy(m, ids, 12)
    assert tokens == dense_tokens and torch.equal(logits, dense_logits)
    detach_predictors(m)
    attach_tensors(m, _thresholds(m, 0.05))
    ffn = m.layers[1].ffn
    x = torch.randn(3, m.config.dim)
    y, kept = ffn.sparse(x)
    h = ffn.dense.hidden(x)[1]
    keep = h.abs() > 0.05
    assert torch.equal(kept, keep.sum(1, dtype=torch.int32)) and 0 < int(kept.sum()) < 3 * 256
    torch.testing.assert_close(y, linear(torch.where(keep, h, torch.zeros_like(h)), ffn.dense.w_down))
    ffn.reset_stats()
    ffn(x[:1])
    assert ffn.stats()["weight_bytes"] == ffn.dense.weight_bytes()  # masked rows are still read
