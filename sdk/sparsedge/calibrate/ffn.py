"""Offline FFN calibration: build predictors and calibrate thresholds from collected FFN inputs.
(Collection: sparsedge.calibrate.collect; the CLI and the artifact write: sparsedge.calibrate.ffn_cli.)

    python tools/calibrate.py --model smollm2-135m --out art/ --text wiki.test.raw --text-start 0.5 \
        [--rank R] [--s 0.8] [--penalty full|act|h|fisher] [--tau-target 0.5] [--export powerinfer DIR]
    python tools/calibrate.py ... --predictor q4 [--q4-group 64]     (SiLU/GELU models: sdk/sparsedge/ffn/q4.py)

1. Collection: the dense model runs the calibration text at batch 1 in windows of --seq-len tokens;
   a hidden_hook stores every layer's FFN input x. Windows alternate between the SVD half (A) and the
   threshold half (B). Only x is kept (fp32, at most --max-layer-tokens rows per layer and half); the
   gate pre-activation and h are recomputed from x layer by layer, so memory stays at
   n_layers * tokens * d floats. The fisher penalty also needs dL/dy per layer: collect_loss_grads runs
   the same weights in transformers with a backward pass and keeps x and the gradient (twice the memory).
2. Per layer: X_A^T X_A in float64 -> whitened SVD -> P1, P2; tau for silu/gelu on A; scores, h and the
   penalty weights on B -> greedy thresholds -> bias; recall and sparsity measured on B.
   With --predictor q4: W_gate and W_up rounded to 4 bits (GPTQ against X_A^T X_A unless --q4-rounding
   nearest), scores |act(g^) u^| on A and B -> the same greedy thresholds (no runtime tau, penalty on
   the untouched h; fisher and global allocation by default; --fisher-labels model --fisher-samples K
   takes the gradients from K label sets sampled from the model instead of the text's next tokens).
3. Global allocation (--allocation global): first every layer's heap runs along a grid of targets, giving
   its penalty-vs-sparsity curve; the model-wide target is then split over the layers where it costs the
   least (predictor.allocate_layer_targets) and step 2 runs with those per-layer targets.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from sparsedge.calibrate import predictor as P
from sparsedge.ffn import q4
from sparsedge.activations import activate
from sparsedge.ops.ffn import q4_estimates

SECTION = "ffn"


@dataclass
class Variant:
    """One calibration recipe (the ablation and the s sweep are lists of these)."""
    s: float = 0.8
    penalty: str = "full"
    whiten: bool = True
    bias_mode: str = "calibrated"  # or "zero": one global zero threshold (no per-neuron bias)
    rank: int | None = None  # None: default_rank(I)
    tau_target: float = 0.5  # silu/gelu: fraction of |act(gate)| zeroed by tau (0 disables tau)
    runtime_tau: bool = True  # apply tau in the kernel (else tau only defines the calibration target)
    predictor: str = "svd"  # or "q4": the 4-bit gate x up predictor (sdk/sparsedge/ffn/q4.py); never a runtime tau
    group: int = q4.DEFAULT_GROUP  # q4: inputs per quantization scale
    rounding: str = "gptq"  # q4: "gptq" (output-aware, X^T X of the A half) or "nearest"
    allocation: str = "layer"  # or "global": spread the model-wide target over layers (needs penalty fisher)
    hull: bool = True  # heap steps along each neuron's convex penalty hull (False: one quantile at a time)
    neuron_cap: float = 0.95  # no neuron is cut on more than this fraction of the calibration tokens
    name: str = ""


def _hidden(dense, x: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, h) in fp32 for x [N, d] (dense weights as fp32), chunked."""
    wg = dense.w_gate.float().cpu()
    wu = dense.w_up.float().cpu()
    gs, hs = [], []
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk]
        g = xc @ wg.T
        u = xc @ wu.T
        gs.append(g)
        hs.append(activate(g, u, dense.activation, float(dense.act_param), 0.0))
    return torch.cat(gs), torch.cat(hs)


def _apply_tau(h: torch.Tensor, g: torch.Tensor, tau: float, activation: str, act_param: float) -> torch.Tensor:
    if tau <= 0:
        return h
    a = P.act_values(g, activation, act_param)
    return torch.where(a.abs() < tau, torch.zeros_like(h), h)


# ---- calibration ---------------------------------------------------------------------------------
ALLOCATION_GRID = [k / 100 for k in range(96)]  # per-layer targets tried by the global allocation


class _Layer:
    """One layer's calibration inputs and what variants share (g, h, SVD factors, q4 packs), made once.

    The SVD predictor is fitted on the A half, so its thresholds are calibrated on B. The q4 predictor fits
    nothing (it is a rounding of the weights), so its thresholds use every token, A and B: the fisher
    penalty's per-token gradients are noisy, and twice the tokens calibrate markedly better thresholds."""

    def __init__(self, model, i: int, x_a: torch.Tensor, x_b: torch.Tensor, grads: tuple | None,
                 packs: dict | None = None):
        self.i, self.x_a, self.x_b = i, x_a, x_b
        self.packs = {} if packs is None else packs  # q4 weight packs, which the caller may keep
        self.grad_a, self.grad_b = grads if grads is not None else (None, None)
        self.dense = getattr(model.layers[i].ffn, "dense", model.layers[i].ffn)
        self.act, self.ap = self.dense.activation, float(self.dense.act_param)
        self.g_a, self.h_a = _hidden(self.dense, x_a)
        self.g_b, self.h_b = _hidden(self.dense, x_b)
        self.w_gate = self.dense.w_gate.detach().float().cpu()
        self.w_down_t = self.dense.w_down_t.detach().float().cpu()
        self.xtx = None  # X_A^T X_A (float64, d x d), made on first use (x_a_gram)
        self.cache: dict = {}

    def x_a_gram(self) -> torch.Tensor:
        """X_A^T X_A in float64 (d x d): what the whitened SVD and the q4 gptq rounding fit on."""
        if self.xtx is None:
            self.xtx = self.x_a.double().T @ self.x_a.double()
        return self.xtx

    def threshold_tokens(self, predictor: str) -> tuple:
        """(x, g, h, loss grad or None) of the tokens the thresholds are calibrated on."""
        if predictor == "svd":
            return self.x_b, self.g_b, self.h_b, self.grad_b
        if "all" not in self.cache:
            grad = None if self.grad_b is None else torch.cat([self.grad_a, self.grad_b])
            self.cache["all"] = (torch.cat([self.x_a, self.x_b]), torch.cat([self.g_a, self.g_b]),
                                 torch.cat([self.h_a, self.h_b]), grad)
        return self.cache["all"]

    def problem(self, v: Variant) -> dict:
        """What the threshold heap needs for variant v: scores, penalty weights c, the layer-mode target,
        plus the predictor tensors and the facts recorded in the manifest."""
        act, ap, i = self.act, self.ap, self.i
        x, g, h, grad = self.threshold_tokens(v.predictor)
        if v.predictor == "q4":
            key = ("q4", v.group, v.tau_target, v.rounding)
            if key not in self.cache:
                if key not in self.packs:  # kept across calibrate_model's two passes: rounding takes seconds
                    self.packs[key] = q4.pack_gate_up(self.dense.w_gate, self.dense.w_up, v.group,
                                                      self.x_a_gram() if v.rounding == "gptq" else None)
                qw, sc = self.packs[key]
                tau = P.calibrate_tau(self.g_a, act, ap, v.tau_target)
                g_hat, u_hat = (torch.cat(t) for t in zip(*(q4_estimates(x[j:j + 1024], qw, sc)
                                                           for j in range(0, x.shape[0], 1024))))
                # on B tokens (the last rows): gptq rounding fits X_A^T X_A, so A would flatter it
                err = float((g_hat[-512:] - g[-512:]).norm() / g[-512:].norm().clamp_min(1e-30))
                scores = activate(g_hat, u_hat, act, ap, 0.0).abs()  # = q4_scores, from the estimates made
                self.cache[key] = (qw, sc, tau, scores, err)
            qw, sc, tau, scores, err = self.cache[key]
            # tau defines "truly active" for the target only: it never zeroes h at runtime, and the penalty
            # is on the untouched h (the point of this predictor is to skip what truly contributes little)
            hb, runtime_tau = h, 0.0
            truth = P.true_active(_apply_tau(h, g, tau, act, ap))
            tensors = {"q": qw, "scale": sc}
            meta = {"group": v.group, "tau": tau, "q4_rel_error": err}
        elif v.predictor == "svd":
            rank = v.rank or P.default_rank(self.w_gate.shape[0])
            key = (v.whiten, rank, v.tau_target)
            if key not in self.cache:
                p1, p2 = P.whitened_svd(self.w_gate, self.x_a_gram() if v.whiten else None, rank, whiten=v.whiten)
                tau = P.calibrate_tau(self.g_a, act, ap, v.tau_target)
                hb = _apply_tau(h, g, tau, act, ap)
                scores = P.scores_of(x, p1, p2)
                err = P.activation_error(self.w_gate, p1, p2, x[:512])
                self.cache[key] = (p1, p2, tau, hb, scores, err)
            p1, p2, tau, hb, scores, err = self.cache[key]
            runtime_tau = tau
            truth = P.true_active(hb)
            tensors = {"p1": p1.contiguous(), "p2": p2.contiguous()}
            meta = {"rank": int(p1.shape[0]), "tau": tau, "svd_rel_error": err}
        else:
            raise ValueError(f"unknown predictor {v.predictor!r} (svd or q4)")
        if v.penalty == "fisher" and grad is None:
            raise ValueError("the fisher penalty needs loss gradients: collect the calibration data with "
                             "collect_loss_grads (tools/calibrate.py does so for --penalty fisher)")
        true_sp = 1.0 - truth.float().mean().item()
        return {"scores": scores, "truth": truth, "tensors": tensors, "meta": {**meta, "tokens": x.shape[0]},
                "c": P.importance(hb, g, self.w_down_t, v.penalty, act, ap, runtime_tau, grad),
                "c_full": P.importance(hb, g, self.w_down_t, "full", act, ap, runtime_tau),
                "target": max(0.0, (v.s - (0.1 if i < 2 else 0.0)) * true_sp)}


def calibrate_model(model, xa: list[torch.Tensor], xb: list[torch.Tensor], variants: list[Variant],
                    n_points: int = 256, free_cap: float = 0.95, guard: float = 0.01,
                    progress: bool = True, grads: tuple[list, list] | None = None) -> list[tuple[dict, dict]]:
    """Run every variant over every layer; returns [(tensors, per-layer meta lists)] per variant.

    grads = (A half, B half) per layer: the loss gradient of each layer's FFN output on the xa / xb tokens
    (collect_loss_grads), needed by the fisher penalty. Variants with allocation="global" first run each
    layer's heap along a grid of targets (penalty_path), then split the model-wide target (the mean of the
    per-layer s x true sparsity targets) over the layers where it costs least (allocate_layer_targets), then
    calibrate as usual."""
    cfg = model.config
    L = cfg.n_layers
    for v in variants:
        if v.allocation not in ("layer", "global"):
            raise ValueError(f"unknown allocation {v.allocation!r} (layer or global)")
        if v.predictor == "q4" and v.rounding not in ("gptq", "nearest"):
            raise ValueError(f"unknown q4 rounding {v.rounding!r} (gptq or nearest)")
        if v.allocation == "global" and v.bias_mode != "calibrated":
            raise ValueError("global allocation needs calibrated thresholds (bias_mode='calibrated')")

    packs: list[dict] = [{} for _ in range(L)]

    def layer(i):
        return _Layer(model, i, xa[i], xb[i], (grads[0][i], grads[1][i]) if grads is not None else None, packs[i])

    targets: dict[int, list[float]] = {}
    glob = [vi for vi, v in enumerate(variants) if v.allocation == "global"]
    if glob:
        paths: dict[int, list] = {vi: [] for vi in glob}
        base: dict[int, list] = {vi: [] for vi in glob}
        for i in tqdm(range(L), desc="FFN cost curves per layer", unit="layer", disable=not progress):
            lay = layer(i)
            shared: dict = {}  # variants that differ only in s (a --ppl-budget grid) share one curve
            for vi in glob:
                prob = lay.problem(variants[vi])
                key = repr(replace(variants[vi], s=0.0, name=""))
                if key not in shared:
                    shared[key] = P.penalty_path(prob["scores"], prob["c"], ALLOCATION_GRID, n_points, free_cap,
                                                 guard, variants[vi].hull, variants[vi].neuron_cap)
                paths[vi].append(shared[key])
                base[vi].append(prob["target"])
        for vi in glob:
            targets[vi] = P.allocate_layer_targets(paths[vi], ALLOCATION_GRID, sum(base[vi]) / L)
            logger.info(f"{variants[vi].name or 'variant'}: per-layer targets {[round(t, 2) for t in targets[vi]]}")
    results = [({}, {"layers": []}) for _ in variants]
    for i in tqdm(range(L), desc="calibrating FFN layers", unit="layer", disable=not progress):
        lay = layer(i)
        for vi, v in enumerate(variants):
            prob = lay.problem(v)
            target = targets[vi][i] if vi in targets else prob["target"]
            if v.bias_mode == "zero":
                bias, info = torch.zeros(prob["scores"].shape[1]), {"calib_sparsity": None}
            elif v.bias_mode == "calibrated":
                bias, info = P.calibrate_thresholds(prob["scores"], prob["c"], target, n_points, free_cap, guard,
                                                    v.hull, v.neuron_cap)
            else:
                raise ValueError(f"unknown bias mode {v.bias_mode!r} (calibrated or zero)")
            pred = (prob["scores"] + bias[None, :]) > 0
            rs = P.recall_stats(pred, prob["truth"], prob["c_full"])
            tensors, meta = results[vi]
            tensors.update({f"layers.{i}.{k}": t for k, t in prob["tensors"].items()})
            if v.predictor == "q4":
                tensors[f"layers.{i}.thresh"] = (-bias).contiguous()
            else:
                tensors[f"layers.{i}.bias"] = bias.contiguous()
            meta["layers"].append({"layer": i, **prob["meta"], "target_sparsity": target, **rs,
                                   **{k: info[k] for k in info if k != "steps"}})
    out = []
    for v, (tensors, meta) in zip(variants, results):
        layers = meta["layers"]
        if v.predictor == "q4":
            meta.update({"method": "q4-predictor", "predictor": "q4", "group": v.group})
        else:
            meta.update({"method": "svd-predictor", "predictor": "svd", "rank": [m["rank"] for m in layers]})
        meta.update({
            "activation": cfg.activation,
            "tau": [m["tau"] if v.runtime_tau and v.predictor == "svd" else 0.0 for m in layers],
            "calibration_tau": [m["tau"] for m in layers],
            "settings": {**asdict(v), "n_points": n_points, "free_cap": free_cap, "guard": guard,
                         "tokens_svd": int(sum(x.shape[0] for x in xa) / max(L, 1)),
                         "tokens_threshold": layers[0]["tokens"] if layers else 0},
            "target_sparsity": [m["target_sparsity"] for m in layers],
            "recall": [m["recall"] for m in layers],
            "predicted_sparsity": [m["predicted_sparsity"] for m in layers],
            "true_sparsity": [m["true_sparsity"] for m in layers],
            "mean": {k: sum(m[k] for m in layers) / len(layers)
                     for k in ("recall", "weighted_recall", "predicted_sparsity", "true_sparsity")},
        })
        out.append((tensors, meta))
    return out


def export_powerinfer(tensors: dict, n_layers: int, out_dir) -> Path:
    """PowerInfer's predictor layout: per layer fc1 = Linear(d, r, bias=False) (weight [r, d] = P1) and
    fc2 = Linear(r, I, bias=True) (weight [I, r] = P2, bias [I]); a neuron is predicted active when
    fc2(fc1(x)) > 0. Written as `predictors.safetensors` (keys model.layers.{i}.fc1.weight,
    model.layers.{i}.fc2.weight, model.layers.{i}.fc2.bias) plus one torch file per layer,
    `model_{i}.pt`, holding the same three tensors as a state dict (fc1.weight, fc2.weight, fc2.bias)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = {}
    for i in range(n_layers):
        sd = {"fc1.weight": tensors[f"layers.{i}.p1"].float().contiguous(),
              "fc2.weight": tensors[f"layers.{i}.p2"].float().contiguous(),
              "fc2.bias": tensors[f"layers.{i}.bias"].float().clamp(-3e38, 3e38).contiguous()}
        torch.save(sd, out / f"model_{i}.pt")
        flat.update({f"model.layers.{i}.{k}": v for k, v in sd.items()})
    save_file(flat, str(out / "predictors.safetensors"), metadata={"layout": "powerinfer-predictor"})
    (out / "README.txt").write_text(export_powerinfer.__doc__ + "\n")
    return out


