"""Offline FFN calibration: collect activations, build predictors, calibrate thresholds, write the artifact.

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

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from sparsedge.calibrate import predictor as P
from sparsedge.ffn import q4
from sparsedge.activations import RELU_FAMILY, activate
from sparsedge.evaluate import read_text, token_windows  # noqa: F401  (re-exported for the CLIs)
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


# ---- data ------------------------------------------------------------------------------------------
def collect_inputs(model, windows: list[list[int]], max_layer_tokens: int | None = None,
                   progress: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: FFN inputs x of the A half (even windows) and the B half (odd windows), fp32 on CPU."""
    from sparsedge.kv_cache import KVCache

    store = [[[], []] for _ in range(model.config.n_layers)]
    half = [0]
    hook = lambda i, h: store[i][half[0]].append(h.detach().float().cpu().clone())  # noqa: E731
    max_len = max(len(w) for w in windows)
    model.ensure_rope(max_len)
    cache = KVCache.dense(model.config, max_len, model.dtype, model.device)
    with torch.inference_mode():
        for n, w in enumerate(tqdm(windows, desc="collecting FFN inputs", unit="window", disable=not progress)):
            half[0] = n % 2 if len(windows) > 1 else 0
            cache.truncate(0)
            model(torch.tensor(w, dtype=torch.long, device=model.device), 0, cache, hidden_hook=hook)
    return _halves(store, len(windows), model.config.dim, max_layer_tokens)


def check_fisher_sampling(labels: str, samples: int) -> None:
    """Refuse a label source / sample count collect_loss_grads cannot honour (before any model is loaded)."""
    if labels not in ("data", "model"):
        raise ValueError(f"unknown fisher labels {labels!r} (data: the text's next tokens; model: sampled from "
                         f"the model's own prediction)")
    if samples < 1 or (labels == "data" and samples != 1):
        raise ValueError(f"--fisher-samples {samples}: give at least 1, and more than 1 only with --fisher-labels "
                         f"model (the text has one next token per position)")


def collect_loss_grads(hf_model, windows: list[list[int]], max_layer_tokens: int | None = None,
                       progress: bool = True, labels: str = "data", samples: int = 1,
                       seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[list, list]]:
    """(xa, xb, (grads_a, grads_b)): collect_inputs' halves plus, per half, gradients of the next-token loss
    with respect to each layer's FFN output (what the fisher penalty weighs skips by): [N, samples, d].

    labels="data": the text's own next tokens (the empirical Fisher; one sample, the last position of a window
    has none). labels="model": `samples` label sets drawn from the model's own next-token distribution at every
    position. The mean of (grad . delta)^2 over them estimates delta^T F delta with F the true Fisher, the
    Hessian of the KL to the dense model's prediction, which is what a skipped pair adds to the loss on
    average; more samples give a less noisy estimate. Each sample is one more backward pass over the shared
    forward graph.

    Our decoder runs fused inference kernels without autograd, so this pass runs the same weights in
    transformers (sdk/hf_reference.py; the FFN inputs agree with ours to ~1e-6) and backpropagates."""
    check_fisher_sampling(labels, samples)
    layers = hf_model.model.layers
    L, d = len(layers), hf_model.config.hidden_size
    store = [[[], []] for _ in range(L)]
    xs: list = [None] * L
    gs: list = [[] for _ in range(L)]
    gen = torch.Generator().manual_seed(seed)

    def hook(i):
        def fwd(module, args, out):
            xs[i] = args[0].detach()[0].float()
            out.register_hook(lambda g: gs[i].append(g.detach()[0].float()))
        return fwd

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    # only activation gradients are needed: frozen weights skip the weight-gradient GEMMs (a third of the work)
    trainable = [p for p in hf_model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    embed = hf_model.get_input_embeddings()
    try:
        for n, w in enumerate(tqdm(windows, desc="collecting FFN inputs and loss gradients", unit="window",
                                   disable=not progress)):
            ids = torch.tensor([w], dtype=torch.long)
            logits = hf_model(inputs_embeds=embed(ids).detach().requires_grad_(True)).logits[0].float()
            for k in range(samples):
                if labels == "data":
                    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
                else:
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
                    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                loss.backward(retain_graph=k + 1 < samples)
            half = n % 2 if len(windows) > 1 else 0
            for i in range(L):
                # x and its gradients subsample together; hooks fire from the last layer down, once per sample
                store[i][half].append(torch.cat([xs[i], *gs[i]], 1))
                gs[i] = []
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    xga, xgb = _halves(store, len(windows), (1 + samples) * d, max_layer_tokens)
    return ([x[:, :d].contiguous() for x in xga], [x[:, :d].contiguous() for x in xgb],
            ([x[:, d:].reshape(-1, samples, d).contiguous() for x in xga],
             [x[:, d:].reshape(-1, samples, d).contiguous() for x in xgb]))


def collect(model, model_spec, windows: list[list[int]], max_layer_tokens: int | None = None, grads: bool = False,
            progress: bool = True, fisher_labels: str = "data",
            fisher_samples: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[list, list] | None]:
    """(xa, xb, (grads_a, grads_b) or None): collect_loss_grads through transformers (model_spec: what
    load_transformers_model accepts) when the penalty needs loss gradients, else collect_inputs on `model`."""
    if not grads:
        return (*collect_inputs(model, windows, max_layer_tokens, progress), None)
    from sparsedge.testing.hf_reference import load_transformers_model
    return collect_loss_grads(load_transformers_model(model_spec), windows, max_layer_tokens, progress,
                              fisher_labels, fisher_samples)


def _halves(store, n_windows: int, width: int, max_layer_tokens: int | None):
    """store[i][half] = list of [T, width] chunks -> (A half, B half) per layer, each subsampled to at most
    max_layer_tokens rows (a fixed seed, so reruns agree); one window is split by alternate tokens."""
    gen = torch.Generator().manual_seed(0)
    xa, xb = [], []
    for i in range(len(store)):
        parts = []
        for h in (0, 1):
            x = torch.cat(store[i][h]) if store[i][h] else torch.empty(0, width)
            if max_layer_tokens and x.shape[0] > max_layer_tokens:
                x = x[torch.randperm(x.shape[0], generator=gen)[:max_layer_tokens].sort().values]
            parts.append(x)
        if n_windows == 1:  # one window: split its tokens
            x = parts[0]
            parts = [x[0::2], x[1::2]]
        xa.append(parts[0])
        xb.append(parts[1])
        store[i] = None
    return xa, xb


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


# ---- CLI ---------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    g = p.add_argument_group("FFN predictors")
    g.add_argument("--predictor", choices=("svd", "q4"), default="svd",
                   help="svd: whitened low-rank gate predictor (docs/methods.md; best on ReLU-family models); q4: 4-bit "
                        "gate x up predictor (sdk/sparsedge/ffn/q4.py; what SiLU/GELU models need, where the gate alone "
                        "does not tell which neurons matter)")
    g.add_argument("--q4-group", type=int, default=q4.DEFAULT_GROUP,
                   help="q4: inputs per quantization scale (even, divides the width; default 64)")
    g.add_argument("--q4-rounding", choices=("gptq", "nearest"), default="gptq",
                   help="q4: round the 4-bit weights so that the estimates x.w^ on the calibration text are "
                        "accurate (gptq, default) or each weight to its nearest level (nearest)")
    g.add_argument("--rank", type=int, default=None, help="predictor rank r (default max(32, 2%% of I))")
    g.add_argument("--s", type=float, default=0.8,
                   help="sparsity scale: per-layer target = s x true sparsity (s - 0.1 on layers 0, 1)")
    g.add_argument("--penalty", choices=P.PENALTIES, default=None,
                   help="threshold penalty: full = |h|*||W_down[:,i]|| (default for svd), fisher = |h * dL/dh| "
                        "with the loss gradient from a transformers backward pass over the calibration text "
                        "(default for q4), act = |act(gate)|, h = |h|")
    g.add_argument("--fisher-labels", choices=("data", "model"), default="data",
                   help="fisher penalty: gradients of the loss on the text's own next tokens (data, the empirical "
                        "Fisher) or on labels sampled from the model's prediction (model: the true Fisher, the "
                        "KL a skip adds; see --fisher-samples)")
    g.add_argument("--fisher-samples", type=int, default=1,
                   help="--fisher-labels model: label samples per token, one backward pass each (default 1)")
    g.add_argument("--allocation", choices=("layer", "global"), default=None,
                   help="layer: every layer targets s x its true sparsity (s - 0.1 on layers 0, 1); global: the "
                        "same model-wide sparsity, spread over the layers where the penalty says it costs least "
                        "(needs a penalty comparable across layers: default global with fisher, else layer)")
    g.add_argument("--tau-target", type=float, default=0.5,
                   help="silu/gelu: fraction of |act(gate)| zeroed by the per-layer tau (default 0.5)")
    g.add_argument("--no-runtime-tau", action="store_true",
                   help="silu/gelu: use tau only to define the target, do not zero h below tau at runtime")
    g.add_argument("--no-whiten", action="store_true", help="plain SVD of W_gate (ablation)")
    g.add_argument("--bias-mode", choices=("calibrated", "zero"), default="calibrated",
                   help="per-neuron calibrated thresholds (default) or one global zero threshold (ablation)")
    g.add_argument("--text-start", type=float, default=0.0,
                   help="start reading --text at this fraction of its length (0.5: its second half)")
    g.add_argument("--max-layer-tokens", type=int, default=None,
                   help="subsample at most this many tokens per layer and half (memory bound)")
    g.add_argument("--quantile-points", type=int, default=256)
    g.add_argument("--neuron-cap", type=float, default=0.95,
                   help="no neuron is predicted off on more than this fraction of the calibration tokens (default "
                        "0.95; 1 lets up to 1%% of a layer's neurons go entirely off)")
    g.add_argument("--export", nargs=2, metavar=("FORMAT", "DIR"), default=None,
                   help="also export the predictors, e.g. --export powerinfer DIR")
    g.add_argument("--ppl-budget", type=float, default=None, metavar="PCT",
                   help="choose s instead of taking --s: calibrate every s of --s-grid and keep the one with the "
                        "most FFN sparsity whose perplexity on held-out calibration text rises by at most PCT "
                        "percent (e.g. 2); fails, writing nothing, when none does")
    g.add_argument("--s-grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                   help="s values tried with --ppl-budget")
    g.add_argument("--budget-tokens", type=int, default=1024,
                   help="calibration tokens held out (not fitted) to measure perplexity with --ppl-budget")


def variant_from_args(args) -> Variant:
    if args.predictor == "q4" and (args.rank is not None or args.no_whiten or args.bias_mode != "calibrated"):
        raise ValueError("--rank, --no-whiten and --bias-mode configure the SVD predictor; drop them with "
                         "--predictor q4")
    penalty = args.penalty or ("fisher" if args.predictor == "q4" else "full")
    check_fisher_sampling(getattr(args, "fisher_labels", "data"), getattr(args, "fisher_samples", 1))
    allocation = args.allocation or ("global" if penalty == "fisher" else "layer")
    return Variant(s=args.s, penalty=penalty, whiten=not args.no_whiten, bias_mode=args.bias_mode,
                   rank=args.rank, tau_target=args.tau_target, runtime_tau=not args.no_runtime_tau,
                   predictor=args.predictor, group=args.q4_group, rounding=args.q4_rounding, allocation=allocation,
                   neuron_cap=args.neuron_cap)


def cfg_activation_is_smooth(model) -> bool:
    """SiLU/GELU: no exact zeros, so gate-based prediction is lossy (see sparsedge.calibrate.oracle)."""
    return model.config.activation not in RELU_FAMILY


def load_for_calibration(args):
    from sparsedge.session import Session
    return Session.load(args.model, dtype=getattr(args, "dtype", None), backend="cpu", progress=True)


def prepare_data(session, args, grads: bool = False):
    """(fitting windows, held-out windows, xa, xb, (grads_a, grads_b) or None); windows are held out only with
    --ppl-budget; grads (collect_loss_grads) when the penalty needs them."""
    text = read_text(args.text, getattr(args, "text_start", 0.0))
    windows = token_windows(session.tokenizer, text, args.tokens, args.seq_len)
    held: list = []
    if getattr(args, "ppl_budget", None) is not None:
        n_hold = max(1, -(-args.budget_tokens // args.seq_len))
        if len(windows) < n_hold + 2:
            raise ValueError(f"--ppl-budget needs more calibration text: {len(windows)} windows of {args.seq_len} "
                             f"tokens, {n_hold} to hold out and at least 2 to fit; raise --tokens")
        windows, held = windows[:-n_hold], windows[-n_hold:]
    return (windows, held, *collect(session.model, args.model, windows, getattr(args, "max_layer_tokens", None),
                                     grads, fisher_labels=getattr(args, "fisher_labels", "data"),
                                     fisher_samples=getattr(args, "fisher_samples", 1)))


class BudgetError(ValueError):
    """No s of the grid keeps the perplexity increase within --ppl-budget."""


def choose_by_budget(session, xa, xb, base: Variant, s_grid: list[float], budget_pct: float,
                     held: list[list[int]], n_points: int = 256,
                     grads: tuple[list, list] | None = None) -> tuple[dict, dict, list[dict]]:
    """Calibrate one variant per s (one SVD per layer serves all), measure each on the held-out windows through
    the per-token sparse path, return (tensors, meta, table) of the sparsest within budget."""
    from sparsedge.evaluate import perplexity
    from sparsedge.ffn.module import attach_tensors, detach_predictors

    model = session.model
    variants = [replace(base, s=s, name=f"s={s}") for s in s_grid]
    results = calibrate_model(model, xa, xb, variants, n_points=n_points, grads=grads)
    dense = perplexity(session, held, progress=False)["ppl"]
    table = []
    for v, (tensors, meta) in tqdm(list(zip(variants, results)), desc="held-out perplexity per s", unit="s"):
        attach_tensors(model, tensors, meta["tau"], per_token=True)
        try:
            r = perplexity(session, held, progress=False)
        finally:
            detach_predictors(model)
        table.append({"s": v.s, "ppl": r["ppl"], "dense_ppl": dense, "ppl_increase_pct": 100 * (r["ppl"] / dense - 1),
                      "ffn_sparsity": r["ffn_sparsity"]})
        logger.info(f"s={v.s}: held-out ppl {r['ppl']:.3f} ({table[-1]['ppl_increase_pct']:+.2f}%), "
                    f"FFN sparsity {r['ffn_sparsity']:.3f}")
    ok = [i for i, row in enumerate(table) if row["ppl_increase_pct"] <= budget_pct]
    if not ok:
        best = min(table, key=lambda row: row["ppl_increase_pct"])
        raise BudgetError(f"no s in {s_grid} keeps the held-out perplexity within +{budget_pct}% (best: s={best['s']} "
                          f"at {best['ppl_increase_pct']:+.2f}% for {100 * best['ffn_sparsity']:.1f}% FFN sparsity); "
                          f"nothing was written. Raise --ppl-budget, try smaller --s-grid values, on SiLU/GELU "
                          f"models --no-runtime-tau or a lower --tau-target (the runtime tau alone zeroes that "
                          f"fraction of h), or use a ReLU-family model (python -m sparsedge.calibrate.oracle shows this "
                          f"model's bound)")
    i = max(ok, key=lambda j: table[j]["ffn_sparsity"])
    return results[i][0], results[i][1], table


def run(args) -> dict:
    if args.export and args.export[0] != "powerinfer":
        raise SystemExit(f"--export: unknown format {args.export[0]!r} (supported: powerinfer)")
    if args.export and args.predictor != "svd":
        raise SystemExit("--export powerinfer writes PowerInfer's low-rank predictor layout; it has no 4-bit "
                         "predictor, so use it with --predictor svd")
    t0 = time.perf_counter()
    session = load_for_calibration(args)
    model = session.model
    v = variant_from_args(args)
    windows, held, xa, xb, grads = prepare_data(session, args, grads=v.penalty == "fisher")
    n_tok = sum(len(w) for w in windows)
    logger.info(f"calibration text {args.text}: {n_tok} tokens in {len(windows)} windows "
                f"({xa[0].shape[0]} SVD / {xb[0].shape[0]} threshold tokens per layer)"
                + (f", {sum(len(w) for w in held)} held out for the perplexity budget" if held else ""))
    budget_table = None
    if args.ppl_budget is not None:
        grid = [float(x) for x in args.s_grid.split(",") if x.strip()]
        if not grid or any(not 0 < x <= 1.5 for x in grid):
            raise ValueError(f"--s-grid must list s values in (0, 1.5], got {args.s_grid!r}")
        tensors, meta, budget_table = choose_by_budget(session, xa, xb, v, grid, args.ppl_budget, held,
                                                       n_points=args.quantile_points, grads=grads)
        v = replace(v, s=meta["settings"]["s"])
    else:
        [(tensors, meta)] = calibrate_model(model, xa, xb, [v], n_points=args.quantile_points, grads=grads)
    meta["settings"].update({"text": Path(args.text).name, "text_start": args.text_start, "tokens": n_tok,
                             "seq_len": args.seq_len, "dtype": str(args.dtype), "chat_template": False})
    if v.penalty == "fisher":
        meta["settings"].update({"fisher_labels": args.fisher_labels, "fisher_samples": args.fisher_samples})
    if budget_table is not None:
        meta["settings"].update({"ppl_budget_pct": args.ppl_budget, "budget_table": budget_table,
                                 "held_out_tokens": sum(len(w) for w in held)})
    from sparsedge.artifact import save_section
    out = save_section(args.out, model, SECTION, tensors, meta)
    summary = {"out": str(out), "seconds": time.perf_counter() - t0, **meta["mean"], "predictor": v.predictor,
               **({"group": v.group} if v.predictor == "q4" else {"rank": meta["rank"][0]}), "s": v.s,
               "penalty": v.penalty, "allocation": v.allocation}
    if budget_table is not None:
        summary["budget_table"] = budget_table
    if args.export:
        summary["export"] = str(export_powerinfer(tensors, model.config.n_layers, args.export[1]))
    if cfg_activation_is_smooth(model) and v.predictor == "svd":
        logger.warning(f"{model.config.activation} model: SVD predictors estimate the gate only, and on SiLU/GELU "
                       f"models even the exact gate is a poor guide to which neurons matter (SmolLM2-135M: 40% "
                       f"skipped costs +9.4% perplexity with the true gate and per-neuron cuts). Use --predictor "
                       f"q4, which estimates gate x up; check the quality with tools/eval.py ppl and the bound "
                       f"with python -m sparsedge.calibrate.oracle")
    logger.info("FFN calibration: " + json.dumps({k: (round(x, 4) if isinstance(x, float) else x)
                                                  for k, x in summary.items()}))
    return summary
