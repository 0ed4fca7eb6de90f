"""The delta-buffer layer cache (DeltaLLM, docs/methods.md §2): same protocol as sparsedge.kv_cache.

Per layer, for its H KV heads (layout of sparsedge/ops/delta.py):
  ref       [H, D]        fp32         running reference key k_hat (starts at zero)
  values    [H, cap]      cache dtype  packed delta values of every encoded token, token after token
  chan      [H, cap]      uint8        channel of each packed value
  offsets   [H, Tmax + 1] int32        token t's deltas are values[h, offsets[h, t]:offsets[h, t + 1]]
                                       (an empty range for positions not encoded yet)
  sink_k    [H, S, D]     cache dtype  dense keys of positions < S (the attention sinks)
  window_k  [H, W, D]     cache dtype  ring of the last W dense keys (position j at slot j % W)
  v_cache   [H, Tmax, D]  cache dtype  dense values

Deferred encoding: a key is delta-encoded only when it leaves the local window (the kernels read the
deltas of keys j <= p - W only; nearer keys are scored exactly from the ring). Positions
0..encoded-1 are encoded; the keys of encoded..length-1 live in the ring (W > 0) and are encoded from it
just before the ring slot is overwritten. So a window key is never held twice (dense in the ring and as
deltas): at 512 tokens with W = 64 that is 1/8 of the delta buffer saved. With W = 0 every key is encoded
at once.

Capacity policy for the packed buffer (values + chan): preallocated at
`initial_density * Tmax * D` entries per head (default density 0.5, i.e. the expected density of a
calibrated theta with headroom). Before each encode the cache makes room: tokens are encoded in
sub-chunks small enough that even a fully dense delta cannot overflow what is free, and when less than
`min(remaining, 16)` dense tokens fit, the buffer grows by `growth * Tmax * D` entries (at least what the
next sub-chunk needs, never beyond the dense worst case Tmax * D), with a logged INFO message. So a
long context with denser deltas than expected costs a reallocation + copy, never corruption; the op's own
bounds check raises if this policy is ever bypassed.

No host read of device tensors on the decode path (on CUDA / NPU every one is a device sync): the cache
keeps a host-side upper bound of the entries in use per head (each encoded token adds at most D), and reads
the true count (offsets[:, encoded], one sync) only when that bound says the next encode could overflow,
i.e. about once every (capacity - used) / D tokens; growth decisions are then the same as with exact counts.
The statistics are host-side records (plain ints: which query positions and encoded ranges happened since
the last reset) folded against `offsets` when read (`stats()`), and before anything rewrites offsets
(`truncate`); `k_bytes()` reads offsets when called. A prefill (T > 1) reads counts only when its chunk might
not fit.

The decode step (one token past the sinks and the first window) is one `delta_step` op where the device has it
fused. Its host counters (length, encoded, the bound, and the first step not yet recorded in the statistics) live
in `state`, an int64 CPU tensor that the C++ decode loop (backends/cpu/decode_loop.cpp) shares: the loop runs the
same op and advances the same counters itself, and calls `attend` back only when the bound says the buffer may
have to grow. The statistics of those steps are recorded (`_sync`) the next time Python looks at them.

Statistics (`stats()`, summed by the Session over layers; `attn_sparsity = zero / scored`):
  scored_delta_entries  sum over the queries of every attend call, of H * D * (number of keys that query
                        scores through deltas, i.e. keys j with S <= j <= p - W for the query at p)
  zero_delta_entries    among those (query, key, head, channel) entries, the ones whose delta is zero
                        (not stored), i.e. the multiply-adds of q.k that the delta path skips.
  encoded_delta_entries / encoded_zero_entries: H * D per key encoded, and the zeros among them
                        (the plain "fraction of zeros in the delta matrix").
A GQA group shares one pattern, so entries are counted per KV head, not per query head.

`truncate(n)`: n == 0 resets; n == length is a no-op; 0 < n < length is implemented honestly when the
ring still holds the dense keys the next query scores exactly and the un-encoded keys (W == 0, the ring
has not wrapped over them, i.e. length - n <= 1 for a wrapped ring): deltas of positions >= n are dropped
and the reference k_hat is rebuilt from the kept ones (in float64, then rounded to fp32; within rounding
of the sequential sum). Otherwise it returns False and the Session re-prefills.
"""
from __future__ import annotations

import math

import torch
from loguru import logger

ops = torch.ops.sparsedge

MIN_DENSE_TOKENS = 16  # grow when fewer dense tokens than this (or than remain) fit in the free space
MAX_PENDING_RUNS = 256  # fold the statistics records (one device read) when this many runs pile up


def _counter(i: int, doc: str) -> property:
    """An int attribute stored in slot i of the cache's host counters (`state`, shared with the C++ loop)."""
    def set_(self, n: int) -> None:
        self._st[i] = n
    return property(lambda self: int(self._st[i]), set_, doc=doc)


class DeltaLayerCache:
    def __init__(self, n_kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype, device,
                 theta, window: int = 64, sinks: int = 4, initial_density: float = 0.5, growth: float = 0.25,
                 layer: int = 0):
        H, D, Tmax = n_kv_heads, head_dim, max_seq_len
        if D > 256:
            raise ValueError(f"delta buffers need head_dim <= 256 (uint8 channel indices), got {D}")
        if window < 0 or sinks < 0:
            raise ValueError(f"window and sinks must be >= 0, got window={window}, sinks={sinks}")
        self.H, self.D, self.Tmax = H, D, Tmax
        self.dtype, self.device, self.layer = dtype, torch.device(device), layer
        self.window, self.n_sink = int(window), int(sinks)
        self.scale = D ** -0.5
        self.initial_density, self.growth = float(initial_density), float(growth)
        th = torch.as_tensor(theta, dtype=torch.float32).flatten()
        if th.numel() == 1:
            th = th.expand(H)
        if th.numel() != H:
            raise ValueError(f"layer {layer}: theta has {th.numel()} entries, expected 1 or {H} (KV heads)")
        if (th < 0).any() or not torch.isfinite(th).all():
            raise ValueError(f"layer {layer}: theta must be finite and >= 0, got {th.tolist()}")
        self.theta = th.clone().to(self.device)
        cap = self._round(max(1, math.ceil(self.initial_density * Tmax * D)))
        cap = min(cap, Tmax * D)
        # host-side counters, shared with the C++ decode loop (backends/cpu/decode_loop.cpp), which runs the decode
        # step itself (`delta_step`) and advances them: [length, encoded, used bound, first position stepped since
        # the statistics were last recorded (-1: none)]. The properties below read them through a numpy view.
        self.state = torch.tensor([0, 0, 0, -1], dtype=torch.int64)
        self._st = self.state.numpy()
        kw = dict(device=self.device)
        self.ref = torch.zeros(H, D, dtype=torch.float32, **kw)
        self.values = torch.zeros(H, cap, dtype=dtype, **kw)
        self.chan = torch.zeros(H, cap, dtype=torch.uint8, **kw)
        self.offsets = torch.zeros(H, Tmax + 1, dtype=torch.int32, **kw)
        self.sink_k = torch.zeros(H, self.n_sink, D, dtype=dtype, **kw)
        self.window_k = torch.zeros(H, self.window, D, dtype=dtype, **kw)
        self.v_cache = torch.zeros(H, Tmax, D, dtype=dtype, **kw)
        self.grow_events = 0
        self.reset_stats()

    length = _counter(0, "Positions cached.")
    encoded = _counter(1, "Positions 0..encoded-1 are delta-encoded (deferred encoding, see above).")
    _used_bound = _counter(2, "Upper bound of max_h offsets[h, encoded] (packed entries in use), exact after a read.")

    @staticmethod
    def _round(n: int) -> int:
        return (n + 255) // 256 * 256

    @property
    def capacity(self) -> int:
        return self.values.shape[1]

    # --- capacity ---------------------------------------------------------------------------
    def _grow(self, need: int, used: int, pos: int) -> None:
        """Grow the packed buffer of every head to hold at least `need` entries (`used` of them are in use by
        the `pos` encoded positions)."""
        old = self.capacity
        step = max(1, math.ceil(self.growth * self.Tmax * self.D))
        new = min(self._round(max(need, old + step)), self.Tmax * self.D)
        if new < need:  # cannot happen: need <= Tmax * D by construction
            raise RuntimeError(f"delta buffer of layer {self.layer} cannot hold {need} entries")
        logger.info(f"delta buffer of layer {self.layer} grows from {old} to {new} entries per head "
                    f"({self.length} tokens cached, density so far {used / max(1, pos * self.D):.2f})")
        values = torch.zeros(self.H, new, dtype=self.dtype, device=self.device)
        chan = torch.zeros(self.H, new, dtype=torch.uint8, device=self.device)
        values[:, :old] = self.values
        chan[:, :old] = self.chan
        # set_: the tensors keep their identity, so a C++ decode plan holding them sees the new storage
        self.values.set_(values)
        self.chan.set_(chan)
        self.grow_events += 1

    def _encode(self, k: torch.Tensor, start: int) -> None:
        """Encode k [T, H, D] at positions start.. (start == encoded) in sub-chunks that cannot overflow,
        growing as needed. No device read while the host-side bound says even dense deltas fit."""
        T, D = k.shape[0], self.D
        if self._used_bound + T * D <= self.capacity:
            ops.delta_encode(k, self.ref, self.theta, self.values, self.chan, self.offsets, start)
            self._used_bound += T * D
            return
        i = 0
        while i < T:
            c = self._room(start + i, T - i)
            ops.delta_encode(k[i:i + c], self.ref, self.theta, self.values, self.chan, self.offsets, start + i)
            i += c
            self._used_bound += c * D

    def _room(self, pos: int, tokens: int) -> int:
        """How many of `tokens` dense tokens fit after the entries in use by positions < pos (exact: one device
        read), growing the buffer first when fewer than min(tokens, MIN_DENSE_TOKENS) do. Sets the bound exact."""
        D = self.D
        used = int(self.offsets[:, pos].max())
        fit = (self.capacity - used) // D
        if fit < min(tokens, MIN_DENSE_TOKENS):
            self._grow(used + min(tokens, MIN_DENSE_TOKENS) * D, used, pos)
            fit = (self.capacity - used) // D
        self._used_bound = used
        return min(tokens, fit)

    def _ring_slot(self, slot: int) -> torch.Tensor:
        """window_k[:, slot] as a [1, H, D] view."""
        return self.window_k[:, slot].unsqueeze(0)

    def _encode_upto(self, target: int, k: torch.Tensor, start: int) -> None:
        """Encode positions encoded..target-1: those before `start` from the ring (they are still there:
        encoded >= start - W), the rest from this call's keys k [T, H, D] (positions start..)."""
        e0 = self.encoded
        if target <= e0:
            return
        if e0 < start:
            W = self.window
            if W == 0 or e0 < start - W:
                raise RuntimeError(f"delta cache of layer {self.layer}: keys {e0}..{start - 1} are neither encoded "
                                   f"nor in the window ring")
            hi = min(start, target)
            if hi - e0 == 1:  # the decode step: one key leaves the window
                ring = self._ring_slot(e0 % W)
            else:
                ring = self.window_k[:, torch.arange(e0, hi, device=self.device) % W].transpose(0, 1)
            self._encode(ring, e0)
            self.encoded = hi
        if target > start:
            lo = max(self.encoded, start)
            self._encode(k[lo - start: target - start], lo)
        self.encoded = target

    def _mark_unencoded(self, n: int) -> None:
        """Positions encoded..n-1 get empty delta ranges, so every kernel (and k_bytes) sees consistent offsets."""
        e = self.encoded
        if n > e:
            self.offsets.narrow(1, e + 1, n - e).copy_(self.offsets.narrow(1, e, 1))

    # --- the layer-cache protocol -------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        T = q.shape[0]
        n = start + T
        if n > self.Tmax:
            raise ValueError(f"positions up to {n} exceed the delta cache's {self.Tmax} tokens")
        if start != self.length:
            if start == 0:
                self.truncate(0)
            elif start < self.length and self.truncate(start):
                pass
            else:
                raise ValueError(f"delta cache holds {self.length} tokens; cannot attend from position {start} "
                                 f"(keys are delta-encoded in order)")
        e0 = self.encoded
        if T == 1 and start >= self.n_sink and e0 == start - self.window:
            return self._step(q, k, v, start)
        self._sync()
        self._write(k, v, start)
        out = ops.delta_attention(q, k, self.v_cache, self.values, self.chan, self.offsets, self.sink_k,
                                  self.window_k, start, self.n_sink, self.window, self.scale)
        self._commit(k, start)
        self._count(start, T, e0)
        return out

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: int) -> torch.Tensor:
        """The decode step past the sinks: the key at e = p - W leaves the ring and is encoded (W = 0: the new
        key itself). What _write, the kernel, _commit and _count do for T = 1, as one `delta_step` op (every backend
        that fuses the delta ops fuses this one too). The C++ decode loop runs the same op and the same counter
        updates when the bound says the key fits (else it calls attend, which grows here)."""
        W, D = self.window, self.D
        e = p - W
        if self._used_bound + D > self.capacity:
            self._room(e, 1)
        out = ops.delta_step(q, k, v, self.ref, self.theta, self.values, self.chan, self.offsets, self.sink_k,
                             self.window_k, self.v_cache, p, self.n_sink, W, self.scale)
        st = self._st
        st[0], st[1] = p + 1, e + 1
        st[2] += D
        if st[3] < 0:
            st[3] = p
        return out

    def _sync(self) -> None:
        """Record the statistics of the decode steps taken since the last record (by _step or the C++ loop,
        which only advance the counters): they are the consecutive positions f..length-1."""
        f = int(self._st[3])
        if f >= 0:
            self._st[3] = -1
            self._count(f, self.length - f, f - self.window)

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append keys/values k, v [T, H, D] without computing attention: the cache state a prefill of these
        positions leaves (used to set up long contexts in benchmarks without an O(T^2) prefill)."""
        self._sync()
        start = self.length
        if start + k.shape[0] > self.Tmax:
            raise ValueError(f"positions up to {start + k.shape[0]} exceed the delta cache's {self.Tmax} tokens")
        self._write(k, v, start)
        self._commit(k, start)

    def _write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Before the kernel: dense V, the keys that leave the window encoded, the sink keys."""
        T = k.shape[0]
        n = start + T
        if T == 1:
            self.v_cache.select(1, start).copy_(v[0])
        else:
            self.v_cache[:, start:n] = v.transpose(0, 1)
        self._encode_upto(n if self.window == 0 else max(self.encoded, n - self.window), k, start)
        self._mark_unencoded(n)
        if start < self.n_sink:
            m = min(self.n_sink, n)
            self.sink_k[:, start:m] = k[: m - start].transpose(0, 1)

    def _commit(self, k: torch.Tensor, start: int) -> None:
        """After the kernel (which reads the ring as it was): the ring keeps the last W positions."""
        T, W = k.shape[0], self.window
        n = start + T
        if W > 0 and T == 1:
            self._ring_slot(start % W).copy_(k)
        elif W > 0:
            lo = max(start, n - W)
            slots = torch.arange(lo, n, device=self.device) % W
            self.window_k[:, slots] = k[lo - start:].transpose(0, 1).to(self.dtype)
        self.length = n

    # --- statistics: host-side records, folded against offsets when read ----------------------
    def _count(self, start: int, T: int, e0: int) -> None:
        """Record the statistics defined in the module docstring for queries start..start+T-1 (keys
        e0..encoded-1 were encoded by this call): entry counts are plain arithmetic; the nonzero counts
        they need are sums of tot[i] = offsets[:, i].sum() (entries over all heads before position i), kept
        as runs of positions and folded by `_fold` (no device read here)."""
        HD = self.H * self.D
        e1 = self.encoded
        if e1 > e0:  # nonzeros of keys e0..e1-1: tot[e1] - tot[e0]
            self._enc_entries += HD * (e1 - e0)
            self._add_run(self._enc_runs, e0, e1)
        S, W = self.n_sink, self.window
        lo, hi = max(start, S + W), start + T - 1  # queries p scoring keys S..p-W (>= 1 of them) by delta
        if lo <= hi:  # nonzeros for the query at p: tot[p - W + 1] - tot[S]
            nq = hi - lo + 1
            self._scored_entries += HD * (nq * (lo - W - S + 1) + nq * (nq - 1) // 2)
            self._add_run(self._query_runs, lo - W + 1, hi - W + 2)

    def _add_run(self, runs: list, a: int, b: int) -> None:
        if runs and runs[-1][1] == a:  # consecutive calls extend one run (only fill() and truncate break it)
            runs[-1][1] = b
            return
        runs.append([a, b])
        if len(runs) > MAX_PENDING_RUNS:
            self._fold()

    def _fold(self) -> None:
        """Fold the pending runs into the nonzero counts: one gather over the prefix sums of tot, one read."""
        self._sync()
        qr, er = self._query_runs, self._enc_runs
        if not qr and not er:
            return
        S = self.n_sink
        # c[i] = sum_{j < i} tot[j]; tot[i] = c[i + 1] - c[i]
        idx, w = [], []
        for a, b in qr:  # sum_{i in [a, b)} (tot[i] - tot[S])
            idx += (b, a, S + 1, S)
            w += ((1, 0), (-1, 0), (a - b, 0), (b - a, 0))
        for a, b in er:  # tot[b] - tot[a]
            idx += (b + 1, b, a + 1, a)
            w += ((0, 1), (0, -1), (0, -1), (0, 1))
        m = max(idx)
        tot = self.offsets[:, :m].sum(0, dtype=torch.int64)
        c = torch.cat([tot.new_zeros(1), tot.cumsum(0)])
        got = c[torch.tensor(idx, device=self.device)]
        nnz_q, nnz_e = (got[:, None] * torch.tensor(w, dtype=torch.int64, device=self.device)).sum(0).tolist()
        self._query_nnz += nnz_q
        self._enc_nnz += nnz_e
        qr.clear()
        er.clear()

    def stats(self) -> dict:
        self._fold()
        return {"scored_delta_entries": self._scored_entries,
                "zero_delta_entries": self._scored_entries - self._query_nnz,
                "encoded_delta_entries": self._enc_entries,
                "encoded_zero_entries": self._enc_entries - self._enc_nnz}

    def reset_stats(self) -> None:
        self._scored_entries = self._query_nnz = 0  # entries scored by delta; the nonzero (stored) ones
        self._enc_entries = self._enc_nnz = 0  # entries of encoded keys; the nonzero ones
        self._query_runs: list = []  # [a, b): one query scored through deltas per tot index in a..b-1
        self._enc_runs: list = []  # [a, b): keys a..b-1 encoded by attend calls
        self._st[3] = -1  # decode steps not recorded yet are dropped too

    # --- rollback ---------------------------------------------------------------------------
    def truncate(self, n: int) -> bool:
        self._sync()
        if n >= self.length:
            return True
        if n <= 0:
            self._fold()  # the records refer to offsets the next prefill rewrites
            self.length = self.encoded = 0
            self.ref.zero_()
            self.offsets[:, 0] = 0
            self._used_bound = 0
            return True
        W, S = self.window, self.n_sink
        if W > 0 and max(S, n - W + 1) < min(n, self.length - W):
            return False  # the ring has overwritten dense keys that queries at n.. would score exactly
        self._fold()
        keep = min(self.encoded, n)  # deltas of positions >= n go; un-encoded keys stay in the ring
        end = self.offsets[:, keep].tolist()
        ref = torch.zeros(self.H, self.D, dtype=torch.float64, device=self.device)
        for h, e in enumerate(end):
            ref[h].index_add_(0, self.chan[h, :e].long(), self.values[h, :e].double())
        self.ref.copy_(ref.float())
        self.length, self.encoded = n, keep
        self._used_bound = max(end)
        self._mark_unencoded(n)
        return True

    # --- bytes ------------------------------------------------------------------------------
    def k_bytes(self) -> int:
        """K-side bytes held for the cached tokens: packed deltas in use (value + uint8 channel), their
        offsets, the reference key, and the dense sink and window keys of cached positions."""
        L = self.length
        if L == 0:
            return 0
        el = self.values.element_size()
        used = int(self.offsets[:, L].sum())
        n_sink = min(self.n_sink, L)
        n_win = min(self.window, L - n_sink)
        return (used * (el + 1) + self.H * (L + 1) * 4 + self.H * self.D * 4
                + (n_sink + n_win) * self.H * self.D * el)

    def k_capacity_bytes(self) -> int:
        """K-side bytes allocated (preallocated capacity, not only what is in use)."""
        el = self.values.element_size()
        return (self.values.numel() * (el + 1) + self.offsets.numel() * 4 + self.ref.numel() * 4
                + (self.sink_k.numel() + self.window_k.numel()) * el)

    def dense_k_bytes(self) -> int:
        return self.length * self.H * self.D * self.values.element_size()

    # --- inspection (tests, calibration) ----------------------------------------------------
    def reconstructed_keys(self) -> torch.Tensor:
        """k_hat [H, encoded, D] (fp32) of every encoded position (the window's keys are not encoded yet)."""
        from sparsedge.ops.delta import reconstruct_keys
        return reconstruct_keys(self.values, self.chan, self.offsets, self.encoded, self.D)
