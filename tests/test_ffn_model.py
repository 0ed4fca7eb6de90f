"""SparseFFN in the decoder: exactness with all-keeping predictors, calibration end to end, stats."""
import pytest

from sparsedge import generate

from sparsedge import stats as work
import torch

from sparsedge.calibrate import ffn_cli

from sparsedge.generate import prefill

from sparsedge import ops
from sparsedge.artifact import ArtifactError, read_manifest, save_section
from sparsedge.backends import get_backend
from sparsedge.ffn import SparseFFN, attach_predictors, set_per_token
from sparsedge.calibrate.collect import collect_inputs
from sparsedge.calibrate.ffn import Variant, calibrate_model, export_powerinfer
from sparsedge.testing.synthetic import all_keeping_predictors, random_transformer, tiny_config
from sparsedge.kv_cache import KVCache


BACKEND = get_backend("cpu")


def greedy(model, prompt, n):
    return generate.greedy(model, prompt, n)[0]


@pytest.mark.parametrize("act", ["relu", "drelu", "relu2", "fatrelu", "gelu_tanh"])
@pytest.mark.parametrize("per_token", [False, True])
def test_all_keeping_predictors_reproduce_dense_greedy(tmp_path, act, per_token):
    cfg = tiny_config(act, activation_param=0.05 if act == "fatrelu" else 0.0)
    model = random_transformer(cfg, seed=3)
    prompt = [5, 17, 3, 99, 42, 7, 64, 1]
    dense_tokens = greedy(model, prompt, 12)
    save_section(tmp_path / "art", model, "ffn", all_keeping_predictors(model), {"tau": [0.0] * cfg.n_layers})
    attach_predictors(model, tmp_path / "art", BACKEND, per_token=per_token)
    assert all(isinstance(layer.ffn, SparseFFN) for layer in model.layers)
    work.reset(model)
    assert greedy(model, prompt, 12) == dense_tokens
    # the sparse module counts its own tokens; work.total adds the dense prefill of the DenseFFN inside it
    n_sparse_tokens = 12 + (len(prompt) if per_token else 0)
    assert model.layers[0].ffn.stats()["sparse_ffn_tokens"] == n_sparse_tokens
    st = work.total(model.layers[0].ffn)
    assert st["ffn_neurons"] == (12 + len(prompt)) * cfg.intermediate_size
    assert st["ffn_predicted"] == st["ffn_neurons"] == st["ffn_gate_up_rows"]


@pytest.mark.parametrize("act,tau", [("relu", 0.0), ("drelu", 0.0), ("relu2", 0.0), ("fatrelu", 0.0),
                                     ("gelu_tanh", 0.0), ("gelu_tanh", 0.2)])
def test_sparse_path_keeps_the_exact_zero_structure(act, tau):
    """Through the sparse FFN path each activation zeroes exactly the neurons the dense FFN zeroes: with every
    neuron predicted active, the kernel accumulates W_down rows for exactly the dense h's nonzeros (down_count), and
    running only those neurons (an oracle active set, sparse_ffn_rows) gives the dense output. relu, drelu, relu2 and
    fatrelu have exact zeros of their own; gelu_tanh has none (every neuron counts) unless a CATS threshold tau makes
    them."""
    cfg = tiny_config(act, activation_param=0.05 if act == "fatrelu" else 0.0)
    model = random_transformer(cfg, seed=3)
    dense = model.layers[1].ffn
    dense.tau = tau
    x = torch.randn(6, cfg.dim, generator=torch.Generator().manual_seed(0))
    _, h = dense.hidden(x)
    y_dense = dense(x)
    nonzero = h != 0
    I = cfg.intermediate_size
    p = all_keeping_predictors(model)
    y, count, down_count = torch.ops.sparsedge.sparse_ffn(x, p["layers.1.p1"], p["layers.1.p2"], p["layers.1.bias"], dense.w_gate,
                                          dense.w_up, dense.w_down_t, act, cfg.activation_param, tau)
    assert count.tolist() == [I] * 6
    assert down_count.tolist() == nonzero.sum(-1).tolist()
    if act == "gelu_tanh" and tau == 0.0:
        assert nonzero.all()
    else:
        assert 0.1 * I < nonzero.sum() / 6 < 0.9 * I  # really sparse, really not empty
    torch.testing.assert_close(y, y_dense, rtol=1e-5, atol=1e-5)
    idx = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # the dense nonzeros first
    y_oracle, dc = torch.ops.sparsedge.sparse_ffn_rows(x, idx, nonzero.sum(-1).to(torch.int32), dense.w_gate, dense.w_up,
                                       dense.w_down_t, act, cfg.activation_param, tau)
    assert dc.tolist() == nonzero.sum(-1).tolist()
    torch.testing.assert_close(y_oracle, y_dense, rtol=1e-5, atol=1e-5)


def tiny_calibration(activation: str, n_layers: int):
    """(config, model, windows, xa, xb): a random tiny model and its FFN inputs over 16 random windows."""
    cfg = tiny_config(activation, n_layers=n_layers, intermediate_size=256)
    model = random_transformer(cfg, seed=4)
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, cfg.vocab_size, (64,), generator=gen).tolist() for _ in range(16)]
    return (cfg, model, windows, *collect_inputs(model, windows, progress=False))


def test_calibrated_predictors_end_to_end(tmp_path):
    cfg, model, windows, xa, xb = tiny_calibration("relu", 2)
    assert xa[0].shape == (512, cfg.dim) and xb[1].shape == (512, cfg.dim)
    variants = [Variant(s=0.8, rank=16), Variant(s=0.5, rank=16, penalty="h"), Variant(whiten=False, bias_mode="zero", rank=16)]
    results = calibrate_model(model, xa, xb, variants, progress=False)
    (tensors, meta), (_, meta_h), (_, meta_zero) = results
    assert meta["rank"] == [16, 16]
    for i, m in enumerate(meta["layers"]):
        s = 0.8 - (0.1 if i < 2 else 0.0)
        assert m["predicted_sparsity"] == pytest.approx(s * m["true_sparsity"], abs=0.02)
        assert 0.3 < m["true_sparsity"] < 0.7  # relu on random weights: about half the neurons are off
        assert m["recall"] > 0.8
    assert meta_h["mean"]["predicted_sparsity"] < meta["mean"]["predicted_sparsity"]
    assert meta_zero["settings"]["bias_mode"] == "zero"
    save_section(tmp_path / "art", model, "ffn", tensors, meta)
    attach_predictors(model, tmp_path / "art", BACKEND)
    set_per_token(model, True)
    model.ensure_rope(64)
    cache = KVCache.dense(cfg, 64, model.dtype, model.device)
    with torch.inference_mode():
        prefill(model, windows[1], cache, all_logits=True)
    st = model.layers[1].ffn.stats()
    sparsity = 1 - st["ffn_gate_up_rows"] / st["ffn_neurons"]
    assert sparsity == pytest.approx(meta["layers"][1]["predicted_sparsity"], abs=0.08)
    assert st["ffn_down_rows"] <= st["ffn_gate_up_rows"]
    f = model.layers[1].ffn
    expect = (st["sparse_ffn_tokens"] * f.predictor_bytes() + 2 * st["ffn_gate_up_rows"] * cfg.dim * 4 + st["ffn_down_rows"] * cfg.dim * 4)
    assert st["weight_bytes"] == expect
    f.reset_stats()
    assert f.stats()["sparse_ffn_tokens"] == 0
    # PowerInfer export layout
    out = export_powerinfer(tensors, cfg.n_layers, tmp_path / "pi")
    from safetensors.torch import load_file
    flat = load_file(str(out / "predictors.safetensors"))
    assert flat["model.layers.1.fc1.weight"].shape == (16, cfg.dim)
    assert flat["model.layers.1.fc2.weight"].shape == (cfg.intermediate_size, 16)
    assert flat["model.layers.1.fc2.bias"].shape == (cfg.intermediate_size,)
    sd = torch.load(out / "model_0.pt")
    fc1 = torch.nn.Linear(cfg.dim, 16, bias=False)
    fc2 = torch.nn.Linear(16, cfg.intermediate_size)
    fc1.load_state_dict({"weight": sd["fc1.weight"]})
    fc2.load_state_dict({"weight": sd["fc2.weight"], "bias": sd["fc2.bias"]})
    x = xb[0][:4]
    idx, count = ops.reference("ffn_predict")(x, tensors["layers.0.p1"], tensors["layers.0.p2"], tensors["layers.0.bias"])
    assert torch.equal((fc2(fc1(x)) > 0).sum(1).int(), count)


def test_attach_refuses_artifact_without_ffn_section(tmp_path):
    model = random_transformer(tiny_config("relu"), seed=5)
    save_section(tmp_path / "art", model, "delta", {"t": torch.zeros(1)}, {})
    with pytest.raises(ArtifactError, match="no 'ffn' section"):
        attach_predictors(model, tmp_path / "art", BACKEND)
    bad = all_keeping_predictors(model)
    bad["layers.1.p2"] = torch.zeros(7, 4)
    save_section(tmp_path / "art", model, "ffn", bad, {})
    with pytest.raises(ArtifactError, match="do not fit"):
        attach_predictors(model, tmp_path / "art", BACKEND)
    assert "delta" in read_manifest(tmp_path / "art")["sections"]


def calibrate_parser():
    """tools/calibrate.py's FFN arguments (what sparsedge.calibrate.ffn_cli.run reads)."""
    import argparse

    p = argparse.ArgumentParser()
    ffn_cli.add_arguments(p)
    for a in ("--model", "--out", "--text", "--dtype"):
        p.add_argument(a)
    p.add_argument("--tokens", type=int)
    p.add_argument("--seq-len", type=int)
    return p


@pytest.mark.slow
def test_stories260k_calibrate_and_eval(tmp_path, stories_path):
    """Real checkpoint (SiLU): calibration hits its targets and evaluation runs the sparse path."""
    import argparse

    from sparsedge import evaluate
    from sparsedge.testing.data import TINYSTORIES_SAMPLE, data_path

    text = data_path(TINYSTORIES_SAMPLE)
    p = calibrate_parser()
    args = p.parse_args(["--model", str(stories_path), "--out", str(tmp_path / "art"), "--text", str(text),
                         "--tokens", "2048", "--seq-len", "256", "--dtype", "float32", "--text-start", "0.5",
                         "--predictor", "svd"])
    from loguru import logger
    msgs: list[str] = []
    logger.enable("sparsedge")
    hid = logger.add(lambda m: msgs.append(str(m)), level="WARNING")
    try:
        summary = ffn_cli.run(args)
    finally:
        logger.remove(hid)
    assert summary["predicted_sparsity"] > 0.3
    assert any("estimate the gate only" in m for m in msgs)  # the SiLU quality warning
    q = argparse.ArgumentParser()
    evaluate.add_ppl_arguments(q)
    base = ["--model", str(stories_path), "--text", str(text), "--max-tokens", "512", "--seq-len", "256"]
    dense = evaluate.run_ppl(q.parse_args(base))
    sparse = evaluate.run_ppl(q.parse_args(base + ["--predictors", str(tmp_path / "art")]))
    dec = evaluate.run_ppl(q.parse_args(base + ["--predictors", str(tmp_path / "art"), "--decode"]))
    assert dense["ffn_sparsity"] is None and sparse["ffn_sparsity"] > 0.3
    assert sparse["ppl"] == pytest.approx(dec["ppl"], rel=1e-3)
    assert sparse["ppl"] < 3 * dense["ppl"]


def test_ppl_budget_picks_the_sparsest_s_within_budget(tmp_path, stories_path):
    """--ppl-budget: every s of the grid is measured on held-out calibration text; the artifact holds the
    sparsest one within budget; an impossible budget fails with a clear error and writes nothing."""
    from sparsedge.artifact import read_manifest
    from sparsedge.testing.data import TINYSTORIES_SAMPLE, data_path

    text = data_path(TINYSTORIES_SAMPLE)
    p = calibrate_parser()
    base = ["--model", str(stories_path), "--text", str(text), "--tokens", "1536", "--seq-len", "256",
            "--dtype", "float32", "--text-start", "0.5", "--budget-tokens", "256", "--s-grid", "0.2,0.5,0.9",
            "--quantile-points", "64", "--predictor", "svd"]
    summary = ffn_cli.run(p.parse_args(base + ["--out", str(tmp_path / "art"), "--ppl-budget", "40"]))
    table = summary["budget_table"]
    assert [row["s"] for row in table] == [0.2, 0.5, 0.9]
    ok = [row for row in table if row["ppl_increase_pct"] <= 40]
    assert ok and summary["s"] == max(ok, key=lambda row: row["ffn_sparsity"])["s"]
    settings = read_manifest(tmp_path / "art")["sections"]["ffn"]["settings"]
    assert settings["ppl_budget_pct"] == 40 and settings["s"] == summary["s"]
    with pytest.raises(ffn_cli.BudgetError, match="nothing was written"):
        ffn_cli.run(p.parse_args(base + ["--out", str(tmp_path / "none"), "--ppl-budget", "-50"]))
    assert not (tmp_path / "none").exists()
