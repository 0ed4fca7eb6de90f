"""Session: load a model once, then generate (or chat) with a preallocated cache.

    s = Session.load("smollm2-135m")                       # dense
    s = Session.load(path, predictors="art/", delta=0.8)   # FFN predictors + delta attention
    r = s.generate("Hello", max_new_tokens=32); r.text, r.token_ids, r.stats
    for piece in s.generate("Hello", stream=True): ...
    s.chat([{"role": "user", "content": "Hi"}])            # keeps the KV cache across turns
"""
from __future__ import annotations

import dataclasses
import gc
import numbers
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from loguru import logger

from sparsedge import stats as work
from sparsedge.backends import get_backend
from sparsedge.generate import decode_one_token, new_cache, prefill
from sparsedge.kv_cache import KVCache
from sparsedge.sampling import Sampler, SamplingParams

DEFAULT_MAX_SEQ_LEN = 2048

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


WEIGHT_MODES = ("native", "q8_0", "q4_0", "q4_1")


class ContextFullWarning(RuntimeWarning):
    """Generation stopped before max_new_tokens because the session's context (max_seq_len) is full."""


class LongContextWarning(RuntimeWarning):
    """The session runs past the context the model was trained on (Session.load(allow_longer_context=True))."""


def _warn(msg: str, category) -> None:
    """warnings.warn attributed to the first caller outside this module (the user's line)."""
    level, f = 2, sys._getframe(1)
    while f.f_back is not None and f.f_back.f_code.co_filename == __file__:
        f, level = f.f_back, level + 1
    warnings.warn(msg, category, stacklevel=level + 1)


def check_context(max_seq_len, trained: int, name: str, allow_longer_context: bool = False) -> int | None:
    """Validate a `max_seq_len=` request against the model's trained context (`trained` positions): an int >= 2;
    above `trained` only with allow_longer_context=True, which then warns. Returns it (None stays None)."""
    if max_seq_len is None:
        return None
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, numbers.Integral):
        raise TypeError(f"max_seq_len must be an integer, got {type(max_seq_len).__name__}")
    ctx = int(max_seq_len)
    if ctx < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {ctx}")
    if ctx > trained:
        if not allow_longer_context:
            raise ValueError(f"max_seq_len={ctx} is above the {trained} positions {name} was trained on (its "
                             f"config's context); positions past them give degraded text. Use max_seq_len <= "
                             f"{trained}, or pass allow_longer_context=True (--allow-longer-context on the command "
                             f"line) to run past the trained context anyway")
        msg = (f"max_seq_len={ctx} is above the {trained} positions {name} was trained on: expect degraded text past "
               f"position {trained} (allow_longer_context=True)")
        logger.warning(msg)
        _warn(msg, LongContextWarning)
    return ctx


def check_weights(weights: str | None) -> str | None:
    """Validate a `weights=` choice: None, "native" (as the file stores them) or a qtype to quantize to."""
    if weights is None:
        return None
    w = str(weights).lower()
    if w not in WEIGHT_MODES:
        raise ValueError(f"unknown weights {weights!r} (supported: {', '.join(WEIGHT_MODES)})")
    return w


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (supported: {', '.join(sorted(_DTYPES))})")
    return _DTYPES[str(dtype).lower()]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens actually run through prefill (chat reuses the cached prefix)
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    stop_reason: str = ""
    weight_bytes_per_token: float = 0.0  # weights a decode step reads (FFN part as executed)
    ffn_predicted_sparsity: float | None = None  # fraction of neurons predicted inactive (decode)
    ffn_sparsity: float | None = None  # executed: gate/up rows skipped
    ffn_down_sparsity: float | None = None  # executed: down rows skipped
    attn_sparsity: float | None = None  # zero delta entries / entries of keys scored by delta
    k_cache_bytes: int = 0
    k_cache_dense_bytes: int = 0
    k_cache_bytes_ratio: float = 1.0
    backend: str = ""
    dtype: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats


class Session:
    def __init__(self, model, tokenizer, backend, max_seq_len: int, delta=None, source: str = ""):
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.config = model.config
        self.max_seq_len = max_seq_len
        self._cache: KVCache | None = None
        self._cache_ids: list[int] = []  # tokens whose k/v are in the cache, in order
        self.delta = None  # sparsedge.delta.DeltaConfig applied to the model's weights, or None
        if delta is not None:
            self.set_delta(delta)
        self.source = source
        self.model.ensure_rope(max_seq_len)
        self.last_result: GenerationResult | None = None

    def set_delta(self, cfg) -> None:
        """Switch delta attention after load (a DeltaConfig, or None for the dense cache): applies it to the
        weights (folds or unfolds its key scale; exact, see sparsedge.delta.balance) and drops the cache."""
        from sparsedge.delta import apply
        apply(self.model, cfg)
        self.delta = cfg
        self._cache, self._cache_ids = None, []

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | os.PathLike, *, backend="auto", dtype=None, weights: str | None = None,
             predictors=None, delta=None, tokenizer=None, max_seq_len: int | None = None,
             allow_longer_context: bool = False, progress: bool = True) -> "Session":
        """Load a model once. Weights: a quantized GGUF runs in its own 4-/8-bit blocks by default; `dtype`
        ("float32", "bfloat16", ...) dequantizes it instead (exact against transformers); `weights` ("q8_0",
        "q4_0", "q4_1") quantizes a float checkpoint's projections on load ("native": as stored). A BitNet b1.58
        folder quantized by transformers keeps its ternary projections packed (sparsedge::bitlinear, int8
        activations per token, as transformers' BitLinear) whatever `dtype`, which then sets the activations'.
        `max_seq_len` (default: the trained context, at most 2048) may not exceed the context the model was
        trained on unless allow_longer_context=True, which warns (LongContextWarning) and runs past it."""
        from sparsedge.loading import open_model
        from sparsedge.loading.build import build_transformer

        be = get_backend(backend)
        mode = check_weights(weights)
        # inputs that can be checked without the weights are checked first (a model load can take minutes)
        from sparsedge.artifact import check_artifact
        ffn_section = None
        if predictors is not None:
            ffn_section = check_artifact(predictors, "ffn", "predictors")["sections"]["ffn"]
        if delta is not None and isinstance(delta, (str, os.PathLike)) and not _is_number(delta):
            check_artifact(delta, "delta", "delta")
        src = open_model(model, tokenizer=tokenizer)
        ctx = check_context(max_seq_len, src.config.max_seq_len, src.config.name or str(model), allow_longer_context)
        if ctx is None:
            ctx = max(2, min(src.config.max_seq_len, DEFAULT_MAX_SEQ_LEN))
        block_ok = True  # whether the FFN artifact (if any) runs on quantized weights
        if ffn_section is not None:
            from sparsedge.ffn.module import runs_on_block_weights
            kind = ffn_section.get("kind") or (ffn_section.get("settings") or {}).get("predictor", "")
            block_ok = runs_on_block_weights(kind, src.config.activation, ffn_section.get("tau"))
        if mode is not None and not block_ok:
            raise ValueError(f"weights={weights!r} keeps quantized projections, but these FFN predictors run on float "
                             f"weights; drop weights= (the session then dequantizes) or drop predictors=")
        if mode is None and dtype is None and getattr(src, "quantized", False):
            if block_ok:
                mode = "native"  # the file's own blocks: the fastest dense path (the sparse paths read them too)
            else:  # the sparse FFN kernels gather float rows: predictors need the dequantized weights
                logger.info("FFN predictors run on float weights: dequantizing the quantized file to float32")
        dt = parse_dtype(dtype) or (torch.float32 if mode is not None else be.default_dtype())
        tm = build_transformer(src, be, dt, progress=progress, mode=mode)
        be.require("rms_norm", "add_rms_norm", "rope", *(("qlinear",) if mode is not None else ()),
                   *(("bitlinear",) if getattr(src, "bitnet", None) is not None else ()))
        delta_cfg = None
        if predictors is not None:
            from sparsedge.ffn import attach_predictors
            attach_predictors(tm, predictors, be)
        if delta is not None:
            from sparsedge.delta import DeltaConfig
            delta_cfg = DeltaConfig.resolve(delta, tm.config, model=tm)  # applied by the constructor below
            be.require("delta_encode", "delta_attention")
        session = cls(tm, src.tokenizer, be, ctx, delta=delta_cfg, source=src.describe())
        # Python's full (generation 2) garbage collections walk every tracked object: ~200K once torch and
        # transformers are imported, 61 ms each on a 2-core EPYC, and they come due during long decodes. The model
        # is built: collect once and move what exists to the permanent generation, so later collections walk only
        # what decoding creates (its short-lived objects). Process-wide: objects alive now that later become cyclic
        # garbage are left to refcounting (a dropped session is freed that way: it holds no cycles; checked with
        # weak references); `gc.unfreeze()` undoes it.
        gc.collect()
        gc.freeze()
        logger.info(f"session ready: {src.describe()} on {be.name} ({dt}), context {ctx}")
        return session

    def new_cache(self, max_seq_len: int | None = None) -> KVCache:
        """A fresh cache of this session's kind (dense, or delta buffers) for `max_seq_len` positions."""
        return new_cache(self.model, max_seq_len or self.max_seq_len, self.delta)

    def reset(self) -> None:
        """Forget the conversation held in the cache."""
        self._cache_ids = []
        with torch.inference_mode():  # the cache tensors were made in inference mode
            if self._cache is not None and not self._cache.truncate(0):
                self._cache = None

    @property
    def stats(self) -> GenerationStats | None:
        return self.last_result.stats if self.last_result else None

    # --- public API -------------------------------------------------------------------------
    def generate(self, prompt_or_ids: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stream: bool = False, ignore_eos: bool = False):
        """Generate from a fresh context. Returns a GenerationResult, or with stream=True an iterator of
        text pieces (the full result is then in `session.last_result` once the iterator is exhausted).
        ignore_eos=True keeps generating past end-of-sequence tokens (benchmarks, as llama.cpp's --ignore-eos)."""
        ids = self._prompt_ids(prompt_or_ids)
        it = self._run(ids, max_new_tokens, SamplingParams(temperature, top_k, top_p, seed), stop, reuse=False,
                       ignore_eos=ignore_eos)
        return it if stream else self._drain(it)

    def chat(self, messages: list[dict], max_new_tokens: int = 256, stream: bool = False, **sampling):
        """One chat turn. `messages` is the whole conversation so far (role/content dicts); the cached
        prefix from earlier turns is reused, so only the new turn's tokens are prefilled."""
        if not self.tokenizer.has_chat_template():
            raise ValueError(f"model {self.config.name!r} has no chat template; use generate() with a plain prompt")
        from sparsedge.tokenizer import check_text
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                check_text(m["content"])
        ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        stop = sampling.pop("stop", None)
        ignore_eos = sampling.pop("ignore_eos", False)
        it = self._run(ids, max_new_tokens, SamplingParams(**sampling), stop, reuse=True, ignore_eos=ignore_eos)
        return it if stream else self._drain(it)

    # --- internals --------------------------------------------------------------------------
    def _prompt_ids(self, prompt_or_ids) -> list[int]:
        if isinstance(prompt_or_ids, str):
            ids = self.tokenizer.encode(prompt_or_ids)
        else:
            ids = token_id_list(prompt_or_ids)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
        if not ids:
            raise ValueError("empty prompt: give at least one token (or a non-empty string)")
        return ids

    @staticmethod
    def _drain(it) -> GenerationResult:
        for _ in it:
            pass
        return it.result  # type: ignore[attr-defined]

    def _run(self, ids, max_new_tokens, params, stop, reuse, ignore_eos=False):
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"prompt is {len(ids)} tokens but the context holds {self.max_seq_len} "
                             f"(prompt + at least one new token); shorten the prompt or load the session "
                             f"with a larger max_seq_len (the model supports {self.config.max_seq_len})")
        return _Generation(self, ids, max_new_tokens, params, stops, reuse, ignore_eos)

    def _prepare_cache(self, ids: list[int], reuse: bool) -> int:
        """Make the cache hold a prefix of `ids`; return how many tokens of it are already there."""
        if self._cache is None:
            self._cache = self.new_cache()
            self._cache_ids = []
        keep = 0
        if reuse:
            for a, b in zip(self._cache_ids, ids[:-1]):  # at least the last prompt token is re-run
                if a != b:
                    break
                keep += 1
        if not self._cache.truncate(keep):
            keep = 0
            self._cache = self.new_cache()
        self._cache_ids = self._cache_ids[:keep]
        return keep


def _is_number(x) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def token_id_list(ids) -> list[int]:
    """A prompt given as token ids -> list[int]; TypeError for anything that is not a flat sequence of ints
    (bytes, floats, bools, nested lists...)."""
    if isinstance(ids, (bytes, bytearray, memoryview)):
        raise TypeError(f"prompt must be a str or a sequence of int token ids, got {type(ids).__name__}; "
                        f"decode bytes to str first (prompt.decode('utf-8'))")
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"prompt tensor must be 1-D integer token ids, got {ids.dtype} of shape "
                            f"{tuple(ids.shape)}")
        return [int(t) for t in ids.reshape(-1).tolist()]
    if not isinstance(ids, Sequence) and not hasattr(ids, "__array__"):
        raise TypeError(f"prompt must be a str or a sequence of int token ids, got {type(ids).__name__}")
    if hasattr(ids, "ndim") and getattr(ids, "ndim") != 1:
        raise TypeError(f"prompt array must be 1-D token ids, got {getattr(ids, 'ndim')} dimensions")
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"prompt must be a str or a sequence of int token ids; item {i} is a "
                            f"{type(t).__name__} ({t!r:.40})")
        out.append(int(t))
    return out


class _Generation:
    """Iterator over text pieces of one generation; `.result` is set when it finishes."""

    def __init__(self, session: Session, ids, max_new_tokens, params, stops, reuse, ignore_eos=False):
        self.s, self.ids, self.max_new, self.params, self.stops, self.reuse = (
            session, ids, max_new_tokens, params, stops, reuse)
        self.ignore_eos = bool(ignore_eos)
        self.result: GenerationResult | None = None
        self._gen = self._steps()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def _steps(self) -> Iterator[str]:
        s, model = self.s, self.s.model
        tok = s.tokenizer
        eos = set() if self.ignore_eos else set(tok.eos_token_ids or []) | set(s.config.eos_token_ids or [])
        sampler = Sampler(self.params, device="cpu")
        with torch.inference_mode():
            keep = s._prepare_cache(self.ids, self.reuse)
            cache = s._cache
            prefill_ids = self.ids[keep:]
            t0 = time.perf_counter()
            logits = prefill(model, prefill_ids, cache, start=keep)
            s.backend.synchronize()
            prefill_s = time.perf_counter() - t0
            s._cache_ids = list(self.ids)
            pos = len(self.ids)
            work.reset(model, cache)  # the statistics describe the decode steps
            new: list[int] = []
            text, emitted, reason = "", 0, "max_new_tokens"
            hold = max((len(x) for x in self.stops), default=1) - 1
            decode_s, steps = 0.0, 0
            while True:
                nxt = sampler(logits[-1])
                new.append(nxt)
                if nxt in eos:
                    reason = "eos"
                    break
                text = tok.decode(new)
                cut = min((i for i in (text.find(x) for x in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    break
                safe = len(text) - hold
                while safe > emitted and text[safe - 1] == "\ufffd":  # incomplete UTF-8 sequence
                    safe -= 1
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                if len(new) >= self.max_new:
                    break
                if pos >= s.max_seq_len:
                    reason = "context_full"
                    msg = (f"the context of {s.max_seq_len} tokens is full: generation stopped after {len(new)} of "
                           f"{self.max_new} new tokens (stop_reason 'context_full'); load the session with a "
                           f"larger max_seq_len or shorten the prompt")
                    logger.warning(msg)
                    _warn(msg, ContextFullWarning)
                    break
                t1 = time.perf_counter()
                logits = decode_one_token(model, nxt, pos, cache)
                s.backend.synchronize()
                decode_s += time.perf_counter() - t1
                steps += 1
                s._cache_ids.append(nxt)
                pos += 1
            if reason == "eos":
                text = tok.decode(new[:-1])
            if len(text) > emitted:
                yield text[emitted:]
        stats = self._stats(len(prefill_ids), prefill_s, steps, decode_s, len(new), reason, cache)
        s.last_result = self.result = GenerationResult(text, new, stats)

    def _stats(self, n_prefill, prefill_s, steps, decode_s, n_new, reason, cache) -> GenerationStats:
        s, model = self.s, self.s.model
        st = GenerationStats(prompt_tokens=len(self.ids), prefill_tokens=n_prefill, new_tokens=n_new,
                             prefill_s=prefill_s, decode_s=decode_s, stop_reason=reason,
                             backend=s.backend.name, dtype=str(model.dtype).replace("torch.", ""))
        st.prefill_tokens_per_s = n_prefill / prefill_s if prefill_s > 0 else 0.0
        st.decode_tokens_per_s = steps / decode_s if decode_s > 0 else 0.0
        w = work.read(model, cache)
        # bytes per decode step as executed; with no step yet, what a dense step reads
        st.weight_bytes_per_token = w.weight_bytes_per_token or float(model.dense_weight_bytes_per_token())
        st.ffn_predicted_sparsity, st.ffn_sparsity, st.ffn_down_sparsity = (
            w.ffn_predicted_sparsity, w.ffn_sparsity, w.ffn_down_sparsity)
        st.attn_sparsity = w.attn_sparsity
        st.k_cache_bytes, st.k_cache_dense_bytes, st.k_cache_bytes_ratio = (
            w.k_cache_bytes, w.k_cache_dense_bytes, w.k_cache_bytes_ratio)
        return st
