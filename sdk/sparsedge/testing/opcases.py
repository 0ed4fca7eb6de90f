"""The op table's machinery: each op module's parity cases (`CASES`, a list of sparsedge.ops.schema.Case) become
programs that build seeded inputs, call the op on a runtime (a device's fused kernels, or the composite
reference) and compare the outputs with the reference's. tests/test_ops.py runs every case on every device;
docs/adding-an-op.md says what a new op adds here (one `@program` function).

Comparison policy, the same for every device (`Tol` carries the device's numbers):
  float outputs      |got - want| <= rtol * max(1, max|want|) + rtol * |want|;
  decisions on sums  (active sets: score vs threshold; down_count: h != 0) equal the reference's except on elements
                     within the device's summation noise of the boundary, `band` (relative to the margins' scale,
                     clamped to [1, 100]; gates are O(1) by construction, so |g| < band / 10), counted exactly;
  elementwise state  (the packed delta buffers) bit-identical where the device promises it (`exact`), else 1e-6.
"""
from __future__ import annotations

import importlib
import math
import pkgutil
import zlib
from typing import Any, Callable, NamedTuple

import torch

import sparsedge.ops
from sparsedge.activations import RELU_FAMILY, activate
from sparsedge.ops.schema import Case


# ----------------------------------------------------------------------------------------------- runtimes
class Runtime:
    """Where a program's op calls go: `op(name)` is the device's fused kernel (or the reference), `to(t)` puts an
    input on the device. A case's "cores" param (CPU threads, NPU cores) is the harness's to apply."""

    def __init__(self, name: str, op: Callable[[str], Callable], to: Callable = lambda t: t):
        self.name, self.op, self.to = name, op, to
        self.reference = name == "reference"


REFERENCE = Runtime("reference", sparsedge.ops.reference)


class Tol(NamedTuple):
    rtol: float  # float outputs
    band: float  # decisions on sums may differ within band * scale of their boundary (0: never)
    exact: bool  # elementwise results (delta buffers) bit-identical


class Program(NamedTuple):
    make: Callable[[], dict]  # seeded CPU inputs (built once per case; `run` must not modify them)
    run: Callable[[Runtime, dict], dict]  # op calls -> outputs; the reference run adds what `check` needs
    check: Callable[[dict, dict, Tol], None]  # (device outputs on CPU, reference outputs, tolerance)
    work: float  # multiply-adds, roughly: slow devices run the large cases only under `-m slow`


_PROGRAMS: dict[str, Callable[[Case], Program]] = {}


def program(op: str):
    """Register the input builder + check of `op`'s cases (one function per op)."""
    def deco(fn):
        _PROGRAMS[op] = fn
        return fn
    return deco


def has_program(op: str) -> bool:
    return op in _PROGRAMS


def build(case: Case) -> Program:
    if case.op not in _PROGRAMS:
        raise KeyError(f"no @program for op {case.op!r} in sparsedge/testing/opcases.py")
    return _PROGRAMS[case.op](case)


def all_cases() -> list[Case]:
    """Every Case in the CASES list of every sparsedge.ops module, in module order."""
    out = []
    for info in pkgutil.iter_modules(sparsedge.ops.__path__):
        mod = importlib.import_module(f"sparsedge.ops.{info.name}")
        out += [c for c in getattr(mod, "CASES", []) if isinstance(c, Case)]
    return out


def generator(case: Case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case.op}:{case.id}".encode()))


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------------ checks
def close(got: torch.Tensor, want: torch.Tensor, tol: Tol, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != the reference's {want.dtype}"
    if not want.numel():
        return
    g, w = got.float(), want.float()
    scale = max(1.0, float(w.abs().max()))
    err = (g - w).abs()
    bad = ~(err <= tol.rtol * scale + tol.rtol * w.abs())  # NaN counts as bad
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{g.numel()} elements off; max err {float(err.max()):.3g} "
                           f"(rtol {tol.rtol}, scale {scale:.3g})")


def equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and torch.equal(got, want), f"{what}: {got.tolist()} != {want.tolist()}"


def active_sets(got: dict, want: dict, tol: Tol, what: str) -> None:
    """got["idx"] / ["count"] (first count[t] ids valid) against want["margin"] (fp64 score - threshold): strictly
    ascending ids in range, equal to {margin > 0} except neurons with |margin| < band * clamp(max|margin|, 1, 100),
    at most max(2, T * I / 500) of those."""
    idx, count, margin = got["idx"], got["count"], want["margin"]
    T, I = margin.shape
    finite = margin[margin.isfinite()].abs()
    band = tol.band * min(max(1.0, float(finite.max()) if finite.numel() else 1.0), 100.0)
    flips = 0
    for t in range(T):
        n = int(count[t])
        assert 0 <= n <= I, f"{what}: count[{t}] = {n}"
        ids = idx[t, :n].long()
        assert n < 2 or bool((ids[1:] > ids[:-1]).all()), f"{what}: idx[{t}] not strictly ascending"
        assert n == 0 or (0 <= int(ids.min()) and int(ids.max()) < I), f"{what}: idx[{t}] out of range"
        mask = torch.zeros(I, dtype=torch.bool)
        mask[ids] = True
        diff = mask ^ (margin[t] > 0)
        far = diff & ~(margin[t].abs() < band)
        assert not far.any(), (f"{what}: token {t}: {int(far.sum())} neurons differ from the reference's set away "
                               f"from the decision boundary (band {band:.2g})")
        flips += int(diff.sum())
    assert flips <= max(2, T * I // 500), f"{what}: {flips} boundary flips (of {T * I})"


def counts(got, want, near_boundary: torch.Tensor, tol: Tol, what: str) -> None:
    """Integer counts of decisions (summed over tokens) off by at most the decisions within band / 10 of their
    boundary (`near_boundary`: their distances to it, fp64)."""
    off = int((got.long() - want.long()).abs().sum())
    slack = int((near_boundary < tol.band / 10).sum())
    assert off <= slack, f"{what}: {got.tolist()} vs the reference's {want.tolist()} ({slack} near their boundary)"


def run_all_close(names: tuple[str, ...]):
    def check(got, want, tol):
        for name in names:
            close(got[name], want[name], tol, name)
    return check


# ---------------------------------------------------------------------------------------------- helpers
def walk_keys(T, H, D, step=0.3, seed=0):
    """Keys with temporal correlation: a Gaussian random walk along the token axis, [T, H, D] fp32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, H, D, generator=g) + (torch.randn(T, H, D, generator=g) * step).cumsum(0)


def randn(gen, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# ------------------------------------------------------------------------------------------ norm, rope
@program("rms_norm")
def _rms_norm(c: Case) -> Program:
    p = c.params
    eps = p.get("eps", 1e-5)

    def make():
        g = generator(c)
        x = randn(g, *p["shape"], dtype=c.dtype)
        w = (1 + randn(g, p["shape"][-1], scale=0.1)).to(torch.float32 if p.get("fp32_weight") else c.dtype)
        return dict(x=x, w=w)

    def run(rt, i):
        return {"y": rt.op("rms_norm")(rt.to(i["x"]), rt.to(i["w"]), eps)}
    return Program(make, run, run_all_close(("y",)), math.prod(p["shape"]))


@program("add_rms_norm")
def _add_rms_norm(c: Case) -> Program:
    p = c.params

    def make():
        g = generator(c)
        return dict(res=randn(g, *p["shape"], dtype=c.dtype), x=randn(g, *p["shape"], dtype=c.dtype),
                    w=(1 + randn(g, p["shape"][-1], scale=0.1)).to(c.dtype))

    def run(rt, i):
        res = rt.to(i["res"].clone())  # written in place: residual += x
        y = rt.op("add_rms_norm")(res, rt.to(i["x"]), rt.to(i["w"]), 1e-5)
        return {"y": y, "residual": res}
    return Program(make, run, run_all_close(("residual", "y")), math.prod(p["shape"]))


@program("rope")
def _rope(c: Case) -> Program:
    T, H, D = c.params["shape"]

    def make():
        pos = torch.arange(100, 100 + T, dtype=torch.float32)
        ang = pos[:, None] / 10000 ** (torch.arange(0, D // 2, dtype=torch.float32) * 2 / D)[None]
        return dict(x=randn(generator(c), T, H, D, dtype=c.dtype), cos=ang.cos(), sin=ang.sin())

    def run(rt, i):
        return {"y": rt.op("rope")(rt.to(i["x"]), rt.to(i["cos"]), rt.to(i["sin"]))}
    return Program(make, run, run_all_close(("y",)), T * H * D)


# ---------------------------------------------------------------------------------------- linear, attention
@program("linear")
def _linear(c: Case) -> Program:
    p = c.params

    def make():
        g = generator(c)
        return dict(x=randn(g, p["T"], p["K"], dtype=c.dtype), w=randn(g, p["N"], p["K"], scale=p["K"] ** -0.5,
                    dtype=c.dtype), b=randn(g, p["N"], dtype=c.dtype) if p["bias"] else None)

    def run(rt, i):
        b = rt.to(i["b"]) if i["b"] is not None else None
        return {"y": rt.op("linear")(rt.to(i["x"]), rt.to(i["w"]), b)}
    return Program(make, run, run_all_close(("y",)), p["T"] * p["K"] * p["N"])


@program("linear_t")
def _linear_t(c: Case) -> Program:
    p = c.params

    def make():
        g = generator(c)
        return dict(x=randn(g, p["T"], p["K"], dtype=c.dtype),
                    w_t=randn(g, p["K"], p["N"], scale=p["K"] ** -0.5, dtype=c.dtype))

    def run(rt, i):
        return {"y": rt.op("linear_t")(rt.to(i["x"]), rt.to(i["w_t"]))}
    return Program(make, run, run_all_close(("y",)), p["T"] * p["K"] * p["N"])


def _attention(c: Case, op: str, window: int | None) -> Program:
    """dense_attention (window None) and dense_attention_window (window >= 0, 0: none): one input recipe."""
    p = c.params
    H, G, D, start, T = p["H"], p["G"], p["D"], p["start"], p["T"]

    def make():
        g = generator(c)
        Tmax = start + T + 5
        return dict(q=randn(g, T, H * G, D, dtype=c.dtype), k=randn(g, H, Tmax, D, dtype=c.dtype),
                    v=randn(g, H, Tmax, D, dtype=c.dtype))

    def run(rt, i):
        args = (rt.to(i["q"]), rt.to(i["k"]), rt.to(i["v"]), start, D ** -0.5)
        return {"out": rt.op(op)(*args) if window is None else rt.op(op)(*args, window)}
    keys = min(start + T, window) if window else start + T
    return Program(make, run, run_all_close(("out",)), 2 * T * H * G * D * keys)


@program("dense_attention")
def _dense_attention(c: Case) -> Program:
    return _attention(c, "dense_attention", None)


@program("dense_attention_window")
def _dense_attention_window(c: Case) -> Program:
    return _attention(c, "dense_attention_window", c.params["window"])


# ------------------------------------------------------------------------------------------------- FFN
def _predictor(g, p, dtype):
    """x, p1, p2, bias and the fp64 margins (score + bias) of the rounded inputs. density d: token 0 has exactly
    round(d * I) active neurons (bias halfway between two of its sorted scores; 0 and 1: -/+1e4, or 1e30 with
    bias="fp32"); bias_std: a random per-neuron bias instead. predictor="fp32": fp32 p1/p2/bias with x in dtype."""
    T, d, I, r = p["T"], p["d"], p["I"], p["r"]
    pdt = torch.float32 if p.get("predictor") == "fp32" else dtype
    x = randn(g, T, d, dtype=dtype)
    p1 = randn(g, r, d, scale=d ** -0.5, dtype=pdt)
    p2 = randn(g, I, r, scale=r ** -0.5, dtype=pdt)
    s0 = (x.double() @ p1.double().t()) @ p2.double().t()
    if "bias_std" in p:
        bias = randn(g, I, scale=p["bias_std"])
    else:
        big = 1e30 if p.get("bias") == "fp32" else 1e4
        k = round(p["density"] * I)  # neurons on for token 0
        s = s0[0].sort(descending=True).values
        cut = -big if k == 0 else big if k == I else -float(s[k - 1] + s[k]) / 2
        bias = torch.full((I,), cut)
    bias = bias.to(torch.float32 if p.get("bias") == "fp32" or "bias_std" in p else pdt)
    return x, p1, p2, bias, s0 + bias.double()


def _ffn_weights(g, d, I, dtype):
    return (randn(g, I, d, scale=d ** -0.5, dtype=dtype), randn(g, I, d, scale=d ** -0.5, dtype=dtype),
            randn(g, I, d, scale=I ** -0.5, dtype=dtype))


def _random_active(g, T, I, density):
    """Per token round(density * I) random neurons, ascending, then the others (unspecified by the contract)."""
    idx, count = torch.empty(T, I, dtype=torch.int32), torch.empty(T, dtype=torch.int32)
    for t in range(T):
        n = round(density * I)
        on = torch.randperm(I, generator=g)[:n].sort().values
        rest = torch.ones(I, dtype=torch.bool)
        rest[on] = False
        idx[t], count[t] = torch.cat([on, rest.nonzero().flatten()]).to(torch.int32), n
    return idx, count


def _act(p):
    return p.get("act", "relu"), p.get("act_param", 0.0), p.get("tau", 0.0)


def _zero_distances(x, idx, count, w_gate, w_up, act, ap, tau) -> torch.Tensor:
    """How far (fp64) each zero decision of h = act(g) * u sits from flipping, over the active neurons: |g| for the
    relu family (act_param for fatrelu), |u| for drelu too, ||act(g)| - tau| with tau > 0."""
    out = [torch.zeros(0, dtype=torch.float64)]
    for t in range(x.shape[0]):
        rows = idx[t, : int(count[t])].long()
        g = w_gate.index_select(0, rows).double() @ x[t].double()
        if act in RELU_FAMILY:
            out.append((g - (ap if act == "fatrelu" else 0.0)).abs())
        if act == "drelu":
            out.append((w_up.index_select(0, rows).double() @ x[t].double()).abs())
        if tau > 0:
            out.append((activate(g, torch.ones_like(g), act, ap, 0.0).abs() - tau).abs())
    return torch.cat(out)


def _rows_reference(i, p):
    """The reference rows on any active set: (y, down_count, decision distances), for a device's own set."""
    act, ap, tau = _act(p)

    def rows(idx, count):
        y, dc = sparsedge.ops.reference("sparse_ffn_rows")(i["x"], idx, count, i["wg"], i["wu"], i["wd"], act, ap, tau)
        return y, dc, _zero_distances(i["x"], idx, count, i["wg"], i["wu"], act, ap, tau)
    return rows


@program("ffn_predict")
def _ffn_predict(c: Case) -> Program:
    p = c.params

    def make():
        x, p1, p2, bias, margin = _predictor(generator(c), p, c.dtype)
        return dict(x=x, p1=p1, p2=p2, bias=bias, margin=margin)

    def run(rt, i):
        idx, count = rt.op("ffn_predict")(*(rt.to(i[k]) for k in ("x", "p1", "p2", "bias")))
        return {"idx": idx, "count": count, **({"margin": i["margin"]} if rt.reference else {})}

    def check(got, want, tol):
        assert got["idx"].dtype == got["count"].dtype == torch.int32 and got["idx"].shape == want["idx"].shape
        active_sets(got, want, tol, "ffn_predict")
    return Program(make, run, check, p["T"] * (p["d"] * p["r"] + p["r"] * p["I"]))


@program("sparse_ffn_rows")
def _sparse_ffn_rows(c: Case) -> Program:
    p = c.params
    act, ap, tau = _act(p)

    def make():
        g = generator(c)
        x = randn(g, p["T"], p["d"], dtype=c.dtype)
        wg, wu, wd = _ffn_weights(g, p["d"], p["I"], c.dtype)
        idx, count = _random_active(g, p["T"], p["I"], p.get("density", 0.5))
        if p.get("bad") == "index":  # an id past I
            idx[0, :2], count[0] = torch.tensor([0, p["I"] + 3]), 2
        return dict(x=x, wg=wg, wu=wu, wd=wd, idx=idx, count=count)

    def run(rt, i):
        y, dc = rt.op("sparse_ffn_rows")(*(rt.to(i[k]) for k in ("x", "idx", "count", "wg", "wu", "wd")), act, ap, tau)
        out = {"y": y, "down_count": dc}
        if rt.reference:
            out["near"] = _zero_distances(i["x"], i["idx"], i["count"], i["wg"], i["wu"], act, ap, tau)
        return out

    def check(got, want, tol):
        assert got["down_count"].dtype == torch.int32
        close(got["y"], want["y"], tol, f"sparse_ffn_rows {act}")
        counts(got["down_count"], want["down_count"], want["near"], tol, "down_count")
    return Program(make, run, check, 3 * p["I"] * p["d"] * (1 + p["T"] * p.get("density", 0.5)))


@program("sparse_ffn")
def _sparse_ffn(c: Case) -> Program:
    """sparse_ffn and, on the same inputs, ffn_predict: the active set is checked against the fp64 margins, y against
    the reference rows on that set."""
    p = c.params
    act, ap, tau = _act(p)
    keys = ("x", "p1", "p2", "bias", "wg", "wu", "wd")

    def make():
        g = generator(c)
        x, p1, p2, bias, margin = _predictor(g, p, c.dtype)
        wg, wu, wd = _ffn_weights(g, p["d"], p["I"], c.dtype)
        return dict(x=x, p1=p1, p2=p2, bias=bias, wg=wg, wu=wu, wd=wd, margin=margin)

    def run(rt, i):
        args = [rt.to(i[k]) for k in keys]
        y, count, dc = rt.op("sparse_ffn")(*args, act, ap, tau)
        idx, count2 = rt.op("ffn_predict")(*args[:4])
        out = {"y": y, "count": count, "down_count": dc, "idx": idx, "predict_count": count2}
        if rt.reference:
            out.update(margin=i["margin"], rows=_rows_reference(i, p),
                       near=_zero_distances(i["x"], idx, count, i["wg"], i["wu"], act, ap, tau))
        return out

    def check(got, want, tol):
        equal(got["count"], got["predict_count"], "sparse_ffn count vs ffn_predict count")
        active_sets(got, want, tol, "sparse_ffn")
        # the reference rows on the device's (checked) set; usually the reference's own
        same = torch.equal(got["count"], want["count"]) and all(
            torch.equal(got["idx"][t, :n], want["idx"][t, :n]) for t, n in enumerate(want["count"].tolist()))
        y, dc, near = (want["y"], want["down_count"], want["near"]) if same else want["rows"](got["idx"], got["count"])
        close(got["y"], y, tol, f"sparse_ffn {act}")
        counts(got["down_count"], dc, near, tol, "down_count")
    work = p["T"] * (p["d"] * p["r"] + p["r"] * p["I"]) + 3 * p["I"] * p["d"] * (1 + p["T"] * p.get("density", 0.5))
    return Program(make, run, check, work)


@program("ffn_predict_q4")
def _ffn_predict_q4(c: Case) -> Program:
    """Random 4-bit rows (every nibble value) and scales; a token whose first group is all zero (amax = 0);
    thresholds keeping none (inf), all (-1) or about half of the non-zero scores (random per neuron)."""
    from sparsedge.ops.ffn import q4_scores

    p = c.params
    T, d, G, I = p["T"], p["d"], p["G"], p["I"]
    act, ap, _ = _act(p)

    def make():
        g = generator(c)
        x = randn(g, T, d, dtype=c.dtype)
        x[0, :G] = 0
        q = torch.randint(0, 256, (I, 2, d // 2), dtype=torch.uint8, generator=g)
        scale = torch.rand(I, 2, d // G, generator=g) * (0.5 / math.sqrt(d))
        scores = q4_scores(x, q, scale, act if c.raises is None else "silu", ap)
        if p["density"] == 0.0:
            thresh = torch.full((I,), float("inf"))
        elif p["density"] == 1.0:
            thresh = torch.full((I,), -1.0)
        else:
            thresh = torch.quantile(scores[scores > 0], 0.5) * (0.5 + torch.rand(I, generator=g))
        margin = scores.double() - thresh.double()
        bad = p.get("bad")
        if bad == "q_dtype":
            q = q.to(torch.int32)
        elif bad == "scale_shape":
            scale = scale[:, :, :1].repeat(1, 1, 3)
        elif bad == "thresh_shape":
            thresh = thresh[:5]
        return dict(x=x, q=q, scale=scale, thresh=thresh, margin=margin)

    def run(rt, i):
        idx, count = rt.op("ffn_predict_q4")(*(rt.to(i[k]) for k in ("x", "q", "scale", "thresh")), act, ap)
        out = {"idx": idx, "count": count}
        if rt.reference:
            assert torch.equal(count, (i["margin"] > 0).sum(-1).to(torch.int32)), "harness: reference != its scores"
            assert p["density"] != 0.5 or 0 < int(count.sum()) < T * I, "thresholds leave no mix of on and off"
            out["margin"] = i["margin"]
        return out

    def check(got, want, tol):
        assert got["idx"].shape == (T, I) and got["idx"].dtype == got["count"].dtype == torch.int32
        active_sets(got, want, tol, f"ffn_predict_q4 {act}")
    return Program(make, run, check, T * I * d)


# ----------------------------------------------------------------------------------------------- delta
def _keys(g, n, H, D, p, dtype):
    if p.get("keys") == "walk":
        return (torch.randn(n, H, D, generator=g) * 0.4).cumsum(0).to(dtype)
    return randn(g, n, H, D, dtype=dtype)


def _theta(p, H):
    th = p.get("theta", 0.0)
    return torch.tensor(th, dtype=torch.float32) if isinstance(th, tuple) else torch.full((H,), float(th))


def _delta_state(H, D, Tmax, cap, n_sink, window, dtype):
    return dict(ref=torch.zeros(H, D), values=torch.zeros(H, cap, dtype=dtype),
                chan=torch.zeros(H, cap, dtype=torch.uint8), offsets=torch.zeros(H, Tmax + 1, dtype=torch.int32),
                sink_k=torch.zeros(H, max(n_sink, 1), D, dtype=dtype),
                window_k=torch.zeros(H, max(window, 1), D, dtype=dtype), v_cache=torch.zeros(H, Tmax, D, dtype=dtype))


def _check_buffers(got, want, n, tol: Tol):
    """Encoded buffers: offsets, channels and values bit-identical (the used part), ref exact (1e-6 off exact)."""
    equal(got["offsets"][:, : n + 1], want["offsets"][:, : n + 1], "offsets")
    for h in range(want["offsets"].shape[0]):
        end = int(want["offsets"][h, n])
        equal(got["chan"][h, :end], want["chan"][h, :end], f"chan[{h}]")
        assert torch.equal(got["values"][h, :end], want["values"][h, :end]), f"values[{h}] differ"
    if tol.exact:
        assert torch.equal(got["ref"], want["ref"]), f"ref: max diff {float((got['ref'] - want['ref']).abs().max())}"
    else:
        torch.testing.assert_close(got["ref"], want["ref"], rtol=1e-6, atol=1e-6)


@program("delta_encode")
def _delta_encode(c: Case) -> Program:
    """Chunk after chunk into zeroed buffers. Error cases: `cap` entries for T tokens of keys scaled by key_scale."""
    p = c.params
    H, D = p["H"], p["D"]
    chunks = p.get("chunks", [p.get("T", 1)])
    n = sum(chunks)

    def make():
        g = generator(c)
        k = _keys(g, n, H, D, p, c.dtype) * p.get("key_scale", 1.0)
        return dict(k=k.to(c.dtype), theta=_theta(p, H))

    def run(rt, i):
        st = {k: rt.to(v) for k, v in _delta_state(H, D, n + 2, p.get("cap", n * D), 0, 0, c.dtype).items()}
        nnz, pos = [], 0
        for T in chunks:
            nnz.append(rt.op("delta_encode")(rt.to(i["k"][pos:pos + T]), st["ref"], rt.to(i["theta"]), st["values"],
                                             st["chan"], st["offsets"], pos))
            pos += T
        return {"nnz": nnz, **{k: st[k] for k in ("ref", "values", "chan", "offsets")}}

    def check(got, want, tol):
        for a, b in zip(got["nnz"], want["nnz"], strict=True):
            equal(a, b, "nnz")
        _check_buffers(got, want, n, tol)
    return Program(make, run, check, n * H * D)


@program("delta_attention")
def _delta_attention(c: Case) -> Program:
    p = c.params
    if "chunks" in p:
        return _delta_chunks(c)
    if p.get("bad") == "offsets":
        return _delta_bad_offsets(c)
    return _delta_on_cache(c)


def _delta_on_cache(c: Case) -> Program:
    """Queries at `start` (one position or a tuple of them) on a cache encoded by the reference: sinks hold the first
    n_sink keys, the window ring the `window` keys before start, v_cache every value."""
    p = c.params
    H, G, D, T, n_sink, window = p["H"], p["G"], p["D"], p["T"], p["n_sink"], p["window"]
    starts = p["start"] if isinstance(p["start"], tuple) else (p["start"],)
    n = max(starts) + T

    def make():
        g = generator(c)
        keys, vals = _keys(g, n, H, D, p, c.dtype), randn(g, n, H, D, dtype=c.dtype)
        st = _delta_state(H, D, n + 3, n * D, n_sink, window, c.dtype)
        sparsedge.ops.reference("delta_encode")(keys, st["ref"], _theta(p, H), st["values"], st["chan"],
                                                st["offsets"], 0)
        st["v_cache"][:, :n] = vals.transpose(0, 1)
        calls = []
        for s in starts:
            sink, win = st["sink_k"].clone(), st["window_k"].clone()
            ns = min(n_sink, s + T)
            sink[:, :ns] = keys[:ns].transpose(0, 1)
            for j in range(max(0, s - window), s):
                win[:, j % window] = keys[j]
            calls.append((s, randn(g, T, H * G, D, dtype=c.dtype), keys[s:s + T], sink, win))
        return dict(st=st, calls=calls)

    def run(rt, i):
        st = {k: rt.to(v) for k, v in i["st"].items() if k in ("v_cache", "values", "chan", "offsets")}
        return {"outs": [rt.op("delta_attention")(rt.to(q), rt.to(k), st["v_cache"], st["values"], st["chan"],
                                                  st["offsets"], rt.to(sink), rt.to(win), s, n_sink, window, D ** -0.5)
                         for s, q, k, sink, win in i["calls"]]}

    def check(got, want, tol):
        for s, a, b in zip(starts, got["outs"], want["outs"], strict=True):
            close(a, b, tol, f"delta_attention at start {s}")
    return Program(make, run, check, sum(T * H * G * D * (s + T) for s in starts))


def _delta_chunks(c: Case) -> Program:
    """The Session's sequence: per chunk, write V, encode the keys, fill the sinks, attend, update the window ring.
    Every buffer ends bit-identical to the reference's; outputs compared from chunk `compare_from` on."""
    p = c.params
    H, G, D, S, W, chunks = p["H"], p["G"], p["D"], p["n_sink"], p["window"], p["chunks"]
    n = sum(chunks)

    def make():
        g = generator(c)
        keys = walk_keys(n, H, D, seed=zlib.crc32(c.id.encode())).to(c.dtype)
        qv = [(randn(g, T, H * G, D, dtype=c.dtype), randn(g, T, H, D, dtype=c.dtype)) for T in chunks]
        return dict(keys=keys, qv=qv, theta=_theta(p, H))

    def run(rt, i):
        st = {k: rt.to(v) for k, v in _delta_state(H, D, n, n * D, S, W, c.dtype).items()}
        theta, outs, nnzs, start = rt.to(i["theta"]), [], [], 0
        for T, (q, v) in zip(chunks, i["qv"]):
            k = rt.to(i["keys"][start:start + T])
            st["v_cache"][:, start:start + T] = rt.to(v).transpose(0, 1)
            nnzs.append(rt.op("delta_encode")(k, st["ref"], theta, st["values"], st["chan"], st["offsets"], start))
            if start < S:
                m = min(S, start + T)
                st["sink_k"][:, start:m] = k[:m - start].transpose(0, 1)
            outs.append(rt.op("delta_attention")(rt.to(q), k, st["v_cache"], st["values"], st["chan"], st["offsets"],
                                                 st["sink_k"], st["window_k"], start, S, W, D ** -0.5))
            for j in range(max(start, start + T - W), start + T):
                st["window_k"][:, j % W] = k[j - start]
            start += T
        out = {"outs": outs, "nnz": nnzs, **{k: st[k] for k in ("ref", "values", "chan", "offsets")}}
        if rt.reference and p.get("vs_dense"):
            q, v, k = i["qv"][0][0], i["qv"][0][1], i["keys"]
            out["dense"] = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True,
                scale=D ** -0.5, enable_gqa=True)[0].transpose(0, 1)
        return out

    def check(got, want, tol):
        for a, b in zip(got["nnz"], want["nnz"], strict=True):
            equal(a, b, "nnz")
        _check_buffers(got, want, n, tol)
        for j in range(p.get("compare_from", 0), len(chunks)):
            close(got["outs"][j], want["outs"][j], tol, f"delta_attention chunk {j}")
        if "dense" in want:  # theta = 0, no sinks, no window: still dense causal attention
            close(got["outs"][0], want["dense"], tol._replace(rtol=max(tol.rtol, 1e-4)), "vs dense attention")
    work, start = 0, 0
    for T in chunks:
        work, start = work + T * H * G * D * (start + T), start + T
    return Program(make, run, check, work)


def _delta_bad_offsets(c: Case) -> Program:
    D = c.params["D"]

    def make():
        st = _delta_state(1, D, 4, 8, 0, 0, c.dtype)
        st["offsets"][:, 1:] = 1000
        return st

    def run(rt, i):
        g = generator(c)
        q, k = randn(g, 1, 1, D), randn(g, 1, 1, D)
        return {"out": rt.op("delta_attention")(rt.to(q), rt.to(k), *(rt.to(i[n]) for n in (
            "v_cache", "values", "chan", "offsets", "sink_k", "window_k")), 0, 0, 0, D ** -0.5)}
    return Program(make, run, run_all_close(("out",)), D)


@program("delta_step")
def _delta_step(c: Case) -> Program:
    """`steps` decode steps after a prefill of `prefill` tokens, whose state (keys before prefill - window encoded,
    the rest in the window ring, as sparsedge.delta.cache leaves it) the reference builds. Outputs, the packed
    buffers, the ring and v_cache against the reference's steps."""
    p = c.params
    H, G, D, S, W, n0 = p["H"], p["G"], p["D"], p["n_sink"], p["window"], p["prefill"]
    n = n0 + p["steps"]
    e0 = max(0, n0 - W)

    def make():
        g = generator(c)
        keys = (_keys(g, n, H, D, p, torch.float32) * p.get("key_scale", 1.0)).to(c.dtype)
        vals = randn(g, n, H, D, dtype=c.dtype)
        qs = randn(g, n, H * G, D, dtype=c.dtype)
        st = _delta_state(H, D, n, p.get("cap", n * D), S, W, c.dtype)
        theta = _theta(p, H)
        if e0:
            sparsedge.ops.reference("delta_encode")(keys[:e0], st["ref"], theta, st["values"], st["chan"],
                                                    st["offsets"], 0)
        st["offsets"][:, e0 + 1:n0 + 1] = st["offsets"][:, e0:e0 + 1]
        ns = min(S, n0)
        st["sink_k"][:, :ns] = keys[:ns].transpose(0, 1)
        for j in range(e0, n0):
            st["window_k"][:, j % W] = keys[j]
        st["v_cache"][:, :n0] = vals[:n0].transpose(0, 1)
        return dict(st=st, keys=keys, vals=vals, qs=qs, theta=theta)

    def run(rt, i):
        st = {k: rt.to(v.clone()) for k, v in i["st"].items()}
        theta, outs = rt.to(i["theta"]), []
        for pos in range(n0, n):
            outs.append(rt.op("delta_step")(
                rt.to(i["qs"][pos:pos + 1]), rt.to(i["keys"][pos:pos + 1]), rt.to(i["vals"][pos:pos + 1]), st["ref"],
                theta, st["values"], st["chan"], st["offsets"], st["sink_k"], st["window_k"], st["v_cache"], pos, S,
                W, D ** -0.5))
        return {"outs": outs, **st}

    def check(got, want, tol):
        _check_buffers(got, want, n - W, tol)
        equal(got["offsets"][:, n - W:n + 1], want["offsets"][:, n - W:n + 1], "offsets of the window")
        for name in ("window_k", "v_cache", "sink_k"):
            assert torch.equal(got[name], want[name]), f"{name} differs from the reference's"
        for j, (a, b) in enumerate(zip(got["outs"], want["outs"], strict=True)):
            close(a, b, tol, f"delta_step at position {n0 + j}")
    return Program(make, run, check, sum(H * G * D * (pos + 1) for pos in range(n0, n)))


@program("qlinear")
def _qlinear(c: Case) -> Program:
    """Fused kernels round x to int8 per block of 32 (as llama.cpp does): checked against the composite reference
    within the exact bound of that rounding, sum_b (amax_b / 254) * sum_{e in b} |W_ne|, plus fp32 accumulation
    (and the output rounding of bf16)."""
    from sparsedge.ops.quant import QCase
    from sparsedge.quant import formats as qf
    from sparsedge.testing.quant import case_inputs

    p = c.params
    q = QCase(p["qtype"], p["N"], p["K"], p["T"], c.dtype)

    def make():
        x, w = case_inputs(q, seed=q.N + q.K + q.T)
        return dict(x=x, w=w)

    def run(rt, i):
        y = rt.op("qlinear")(rt.to(i["x"]), rt.to(i["w"]), q.qtype, q.K)
        if not rt.reference:
            return {"y": y}
        W = qf.dequantize(i["w"], q.qtype, q.K).double().abs()
        x2 = i["x"].double()
        mag = x2.abs() @ W.t()
        bound = 2e-6 * mag
        if q.qtype == "bf16" and q.T > 8:  # prefill GEMMs on bf16 rows may round x to bf16 (quant_linear.cpp)
            bound = bound + 2.0 ** -8 * mag
        if qf.get_format(q.qtype).quantized:
            half_step = x2.reshape(q.T, -1, qf.QK).abs().amax(-1) / 254
            bound = bound + half_step.repeat_interleave(qf.QK, 1) @ W.t()
        return {"y": y, "bound": bound}

    def check(got, want, tol):
        y, ref = got["y"], want["y"]
        assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.shape, ref.dtype)
        out_round = ref.double().abs() * (2.0 ** -7 if c.dtype == torch.bfloat16 else 0.0)
        err = (y.double() - ref.double()).abs()
        excess = err - (want["bound"] + out_round + 1e-3 * tol.rtol * want["bound"].max())
        assert torch.all(excess <= 0), f"qlinear {q}: max excess over the int8 rounding bound {excess.max():.3e}"
    return Program(make, run, check, q.T * q.N * q.K)


def _down_bound(hk: torch.Tensor, i: dict) -> torch.Tensor:
    """|y_fused - y_ref| allowed for kept h `hk` [T, I] (float64): one int8 step of h per element times |W_down|,
    plus fp32 accumulation."""
    from sparsedge.ops.qffn import down_weights_t
    from sparsedge.quant import formats as qf
    T = hk.shape[0]
    step = hk.reshape(T, -1, qf.QK).abs().amax(-1) / 127
    wabs = down_weights_t(i["codes"], i["scale"], i["minv"]).abs()
    return step.repeat_interleave(qf.QK, 1) @ wabs + 1e-5 * (hk.abs() @ wabs) + 1e-6


@program("qsparse_ffn")
def _qsparse_ffn(c: Case) -> Program:
    """Thresholds are placed at the requested kept fraction of the reference's |h| and moved away from every
    token's |h| by 1e-3 relative, so fp32 accumulation cannot flip a decision; y is then checked within one int8
    step of h per element (fused h is fp32, the reference's fp64: a value on a rounding boundary may round either
    way) times |W_down|, plus fp32 accumulation."""
    from sparsedge.ops.qffn import hidden_ref
    from sparsedge.quant import formats as qf
    from sparsedge.quant.down_t import DownT
    from sparsedge.quant.qweight import QWeight
    from sparsedge.testing.quant import random_blocks

    p = c.params
    d, I, T, keep = p["d"], p["I"], p["T"], p["keep"]

    def make():
        g = generator(c)
        x = randn(g, T, d)
        x[:, :32] *= 4
        if p["qtype"] in ("q8_0", "q4_0", "q4_1"):
            wgu = qf.quantize(torch.randn(2 * I, d, generator=g) / d ** 0.5, p["qtype"])
        else:
            wgu = random_blocks(p["qtype"], 2 * I, d, g)
        wd = QWeight(qf.quantize(torch.randn(d, I, generator=g) / I ** 0.5, p["down"]), p["down"], I)
        down = DownT.from_qweight(wd)
        h = hidden_ref(x.to(c.dtype), wgu, p["qtype"], I, p["act"], 0.1).abs()  # [T, I] float64
        if keep >= 1.0:
            thresh = torch.full((I,), -1.0)
        elif keep <= 0.0:
            thresh = h.amax(0).float() * 2 + 1
        else:
            jitter = torch.exp(0.3 * torch.randn(I, generator=g, dtype=torch.float64))  # per-neuron thresholds
            thresh = (torch.quantile((h / jitter).reshape(-1), 1 - keep) * jitter).float()
            for _ in range(8):  # away from every |h| of this neuron
                near = ((h - thresh.double()).abs() <= 1e-3 * h.clamp_min(1e-12)).any(0)
                if not near.any():
                    break
                thresh = torch.where(near, thresh * 1.01 + 1e-6, thresh)
        return dict(x=x.to(c.dtype), w=wgu, codes=down.codes, scale=down.scale, minv=down.minv, thresh=thresh)

    def run(rt, i):
        y, count = rt.op("qsparse_ffn")(*(rt.to(i[k]) for k in ("x", "w")), p["qtype"],
                                        *(rt.to(i[k]) for k in ("codes", "scale", "minv", "thresh")), p["act"], 0.1)
        if not rt.reference:
            return {"y": y, "count": count}
        h = hidden_ref(i["x"], i["w"], p["qtype"], I, p["act"], 0.1)
        hk = torch.where(h.abs() > i["thresh"].double(), h, torch.zeros_like(h))
        return {"y": y, "count": count, "bound": _down_bound(hk, i)}

    def check(got, want, tol):
        equal(got["count"], want["count"], "count")
        y, ref = got["y"], want["y"]
        assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.shape, ref.dtype)
        out_round = ref.double().abs() * (2.0 ** -7 if c.dtype == torch.bfloat16 else 0.0)
        excess = (y.double() - ref.double()).abs() - want["bound"] - out_round
        assert torch.all(excess <= 0), f"qsparse_ffn {p}: max excess over the bound {excess.max():.3e}"
    return Program(make, run, check, T * I * d * 3)


@program("qsparse_ffn_rows")
def _qsparse_ffn_rows(c: Case) -> Program:
    """Random ascending neuron lists (a `keep` fraction); y within one int8 step of h per element, as qsparse_ffn."""
    from sparsedge.ops.qffn import hidden_ref, listed

    p = c.params
    base = _qsparse_ffn(c._replace(op="qsparse_ffn"))
    T, I = p["T"], p["I"]

    def make():
        i = base.make()
        g = generator(c)
        chosen = torch.rand(T, I, generator=g) < p["keep"]
        from sparsedge.ops.ffn import compact_active
        i["idx"], i["count"] = compact_active(chosen)
        return i

    def run(rt, i):
        y, count = rt.op("qsparse_ffn_rows")(rt.to(i["x"]), rt.to(i["idx"]), rt.to(i["count"]), rt.to(i["w"]),
                                             p["qtype"], *(rt.to(i[k]) for k in ("codes", "scale", "minv")), p["act"],
                                             0.1)
        if not rt.reference:
            return {"y": y, "count": count}
        h = hidden_ref(i["x"], i["w"], p["qtype"], I, p["act"], 0.1)
        hk = torch.where(listed(i["idx"], i["count"], I), h, torch.zeros_like(h))
        return {"y": y, "count": count, "bound": _down_bound(hk, i)}
    return Program(make, run, base.check, base.work)


@program("bitlinear")
def _bitlinear(c: Case) -> Program:
    """Random ternary rows (a third zeros) with one scale per block of rows (as q/k/v fused), x with a few large
    channels (the per-token absmax decides the rounding step). Integer sums are exact everywhere, so the device rtol
    applies as it is."""
    from sparsedge.quant.ternary import pack

    p = c.params
    T, K, N = p["T"], p["K"], p["N"]

    def make():
        g = generator(c)
        x = randn(g, T, K)
        x[:, : max(1, K // 16)] *= 6
        if p.get("zero_token"):
            x[0] = 0
        w = pack(torch.randint(-1, 2, (N, K), generator=g))
        scale = (10 + 50 * torch.rand(N // 4, generator=g)).repeat_interleave(4)
        bad = p.get("bad")
        if bad == "w_dtype":
            w = w.to(torch.int8)
        elif bad == "w_dim":
            w = w.reshape(-1)
        elif bad == "w_k":
            w = torch.cat([w, w[:, :1]], 1)
        elif bad == "scale_len":
            scale = scale[:1]
        elif bad == "scale_dtype":
            scale = scale.double()
        elif bad == "x_dtype":
            x = x.to(torch.int32)
        return dict(x=x if bad == "x_dtype" else x.to(c.dtype), w=w, scale=scale)

    def run(rt, i):
        return {"y": rt.op("bitlinear")(rt.to(i["x"]), rt.to(i["w"]), rt.to(i["scale"]))}
    return Program(make, run, run_all_close(("y",)), T * N * K)
