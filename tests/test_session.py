"""Session end to end on real models: greedy parity with transformers (SmolLM2-135M, stories260K), the
llama2.c known-good start, sampling, streaming, stop strings, chat cache reuse, and every bad input."""
from __future__ import annotations

import json

import pytest
import torch

from sparsedge.generate import prefill

from sparsedge import Session
from sparsedge.testing.hf_reference import load_transformers_model

from .conftest import need_data, smollm2_gguf

# Logits of our fp32 decoder vs transformers' fp32 forward: the same math in a different op order
# (fused qkv / gate-up GEMVs, fused norms), so they agree to float32 rounding, far below a token flip.
LOGIT_ATOL = 2e-3

PROMPT = "The history of the city begins in the early middle ages, when"


@pytest.fixture(scope="module")
def smollm2():
    smollm2_gguf()  # skip/fail with the reason when the package is missing
    return Session.load("smollm2-135m", backend="cpu", dtype="float32", progress=False)  # dequantized: exact


@pytest.fixture(scope="module")
def smollm2_hf():
    smollm2_gguf()
    return load_transformers_model("smollm2-135m", torch.float32)


@pytest.fixture(scope="module")
def stories():
    return Session.load(need_data("stories260K/stories260K.bin"), backend="cpu", progress=False)


def _hf_greedy(model, ids, n):
    inp = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def _our_logits(session, ids):
    from sparsedge.kv_cache import KVCache

    cache = KVCache.dense(session.config, len(ids) + 1, session.model.dtype, "cpu")
    with torch.inference_mode():
        return prefill(session.model, ids, cache, all_logits=True)


def test_smollm2_greedy_matches_transformers(smollm2, smollm2_hf):
    ids = smollm2.tokenizer.encode(PROMPT)
    ours = smollm2.generate(ids, max_new_tokens=40)
    ref = _hf_greedy(smollm2_hf, ids, 40)
    n = min(len(ref), len(ours.token_ids))
    assert n >= 32 and ours.token_ids[:n] == ref[:n]
    with torch.inference_mode():
        ref_logits = smollm2_hf(torch.tensor([ids])).logits[0]
    diff = (_our_logits(smollm2, ids) - ref_logits).abs().max().item()
    assert diff < LOGIT_ATOL, diff


def test_stories260k_greedy_matches_transformers_and_known_start(stories):
    hf = load_transformers_model(need_data("stories260K/stories260K.bin"))
    ours = stories.generate([1], max_new_tokens=48)
    assert ours.token_ids == _hf_greedy(hf, [1], 48)
    assert ours.text.strip().startswith("Once upon a time, there was a little girl named Lily.")
    with torch.inference_mode():
        ref = hf(torch.tensor([[1] + ours.token_ids[:20]])).logits[0]
    assert (_our_logits(stories, [1] + ours.token_ids[:20]) - ref).abs().max().item() < 1e-4


def test_seeded_sampling_is_reproducible(stories):
    kw = dict(max_new_tokens=30, temperature=0.9, top_k=40, top_p=0.95)
    a = stories.generate([1], seed=7, **kw).token_ids
    assert a == stories.generate([1], seed=7, **kw).token_ids
    assert a != stories.generate([1], seed=8, **kw).token_ids


def test_top_k_one_is_greedy(stories):
    greedy = stories.generate([1], max_new_tokens=20).token_ids
    assert stories.generate([1], max_new_tokens=20, temperature=1.0, top_k=1, seed=3).token_ids == greedy


def test_streaming_text_equals_non_streaming(stories):
    whole = stories.generate("Once upon a time", max_new_tokens=40)
    pieces = list(stories.generate("Once upon a time", max_new_tokens=40, stream=True))
    assert len(pieces) > 5 and "".join(pieces) == whole.text
    assert stories.last_result.token_ids == whole.token_ids


def test_stop_string_cuts_text(stories):
    full = stories.generate([1], max_new_tokens=48).text
    r = stories.generate([1], max_new_tokens=48, stop=["Lily"])
    assert r.stats.stop_reason == "stop" and r.text == full[: full.index("Lily")]
    streamed = "".join(stories.generate([1], max_new_tokens=48, stop="Lily", stream=True))
    assert streamed == r.text


def test_chat_second_turn_prefills_only_new_tokens(smollm2):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r1 = smollm2.chat(msgs, max_new_tokens=12)
    assert r1.stats.prefill_tokens == r1.stats.prompt_tokens
    msgs += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And of Italy?"}]
    r2 = smollm2.chat(msgs, max_new_tokens=12)
    full = smollm2.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert r2.stats.prompt_tokens == len(full)
    new_turn = len(full) - r1.stats.prompt_tokens
    # only the new turn (plus at most the re-tokenised tail of the previous answer) is prefilled
    assert r2.stats.prefill_tokens <= new_turn
    assert r2.stats.prefill_tokens < r2.stats.prompt_tokens // 2
    # and reusing the cache gives what a fresh session would give
    smollm2.reset()
    fresh = smollm2.chat(msgs, max_new_tokens=12)
    assert fresh.token_ids == r2.token_ids and fresh.stats.prefill_tokens == len(full)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=0, temperature=1.0), "top_k must be a positive integer"),
    (dict(stop=[""]), "stop must be a non-empty string"),
])
def test_bad_generation_arguments(stories, kwargs, match):
    kwargs.setdefault("max_new_tokens", 5)
    with pytest.raises(ValueError, match=match):
        stories.generate([1], **kwargs)


def test_prompt_longer_than_context_is_refused_before_any_work():
    s = Session.load(need_data("stories260K/stories260K.bin"), backend="cpu", max_seq_len=16, progress=False)
    with pytest.raises(ValueError, match="prompt is 20 tokens but the context holds 16"):
        s.generate([1] * 20, max_new_tokens=1)
    assert s._cache is None  # nothing was allocated or run
    with pytest.warns(RuntimeWarning, match="context of 16 tokens is full"):  # visible to API users too
        r = s.generate([1] * 10, max_new_tokens=50)  # fits, then stops when the context is full
    assert r.stats.stop_reason == "context_full" and len(r.token_ids) == 7


def test_bad_prompts(stories):
    with pytest.raises(ValueError, match="empty prompt"):
        stories.generate([], max_new_tokens=3)
    with pytest.raises(ValueError, match="token ids out of range"):
        stories.generate([1, 99999], max_new_tokens=3)


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        Session.load(tmp_path / "nope.gguf")


def test_cli_generate_json_and_doctor(capsys):
    from sparsedge.cli import main

    path = str(need_data("stories260K/stories260K.bin"))
    assert main(["generate", "--model", path, "--prompt", "Once", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 8 and out["stats"]["new_tokens"] == 8 and isinstance(out["text"], str)
    assert main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["backends"]["cpu"]["fused_ops"]["rms_norm"] is True
    assert set(rep["backends"]) >= {"cpu", "cuda", "npu"}
    assert main(["generate", "--model", "/nonexistent/model.gguf", "--prompt", "x"]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_greedy_sampler_picks_torch_argmax():
    """The greedy path takes numpy's argmax on CPU float logits: the same first maximum as torch.argmax (ties, NaN,
    fp64), and torch's own argmax for dtypes numpy lacks."""
    from sparsedge.sampling import Sampler, SamplingParams
    s = Sampler(SamplingParams())
    g = torch.Generator().manual_seed(0)
    cases = [torch.tensor([1.0, 3.0, 3.0, 2.0]), torch.tensor([1.0, float("nan"), 3.0]),
             torch.randn(49152, generator=g), torch.randn(100, generator=g).double(),
             torch.randn(100, generator=g).bfloat16()]
    for x in cases:
        assert s(x) == int(torch.argmax(x))


def test_a_dropped_session_is_freed_after_the_gc_freeze():
    """Session.load freezes the GC's permanent generation (objects frozen are no longer collected as cycles). A
    session held when a later one loads must still be freed when dropped: by refcounting, so it holds no cycle."""
    import gc
    import weakref
    path = need_data("stories260K/stories260K.bin")
    a = Session.load(path, backend="cpu", progress=False)
    a.generate("Once upon a time", max_new_tokens=3)
    model, session = weakref.ref(a.model), weakref.ref(a)
    b = Session.load(path, backend="cpu", progress=False)  # freezes `a`
    gc.disable()  # refcounting alone
    try:
        del a
        assert model() is None and session() is None
    finally:
        gc.enable()
        del b
