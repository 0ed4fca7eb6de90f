"""Offline FFN calibration, step 1: collection of the FFN inputs (and loss gradients for the fisher penalty).

The dense model runs the calibration text at batch 1 in windows; a hidden_hook stores every layer's FFN
input x. Windows alternate between the SVD half (A) and the threshold half (B). Only x is kept (fp32, at
most max_layer_tokens rows per layer and half); the gate pre-activation and h are recomputed from x layer
by layer, so memory stays at n_layers * tokens * d floats. The fisher penalty also needs dL/dy per layer:
collect_loss_grads runs the same weights in transformers with a backward pass and keeps x and the gradient.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

def collect_inputs(model, windows: list[list[int]], max_layer_tokens: int | None = None,
                   progress: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: FFN inputs x of the A half (even windows) and the B half (odd windows), fp32 on CPU."""
    store = [[[], []] for _ in range(model.config.n_layers)]
    half = [0]
    hook = lambda i, h: store[i][half[0]].append(h.detach().float().cpu().clone())  # noqa: E731

    def which_half(n):
        half[0] = n % 2 if len(windows) > 1 else 0
    run_windows(model, windows, hook, "collecting FFN inputs", progress, which_half)
    return _halves(store, len(windows), model.config.dim, max_layer_tokens)


def run_windows(model, windows: list[list[int]], hidden_hook, desc: str, progress: bool = True,
                before=None) -> None:
    """Prefill each window from position 0 through the dense model (one cache, reused), `hidden_hook(layer, x)`
    seeing every FFN input; `before(n)` runs ahead of window n."""
    from sparsedge.kv_cache import KVCache

    max_len = max(len(w) for w in windows)
    model.ensure_rope(max_len)
    cache = KVCache.dense(model.config, max_len, model.dtype, model.device)
    with torch.inference_mode():
        for n, w in enumerate(tqdm(windows, desc=desc, unit="window", disable=not progress)):
            if before is not None:
                before(n)
            cache.truncate(0)
            model(torch.tensor(w, dtype=torch.long, device=model.device), 0, cache, hidden_hook=hidden_hook)


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
