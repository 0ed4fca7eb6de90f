"""Bad input and first-run behaviour (issue 15): every bad input is one `error:` line with exit status 2 and no
traceback, checked before the model loads where it can be; no silent wrong result; the CLI summary line; the
llama2.c tokenizer's O(n log n) merge; artifact file modes; the incremental extension build."""
from __future__ import annotations

import json
import os
import random
import runpy
import stat
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from sparsedge import Session
from sparsedge.artifact import ArtifactError, check_output, save_section
from sparsedge.evaluate import TextTooShortError, token_windows
from sparsedge.loading import ModelFormatError, llama2c_to_hf, open_model
from sparsedge.sampling import SamplingParams
from sparsedge.session import ContextFullWarning, LongContextWarning
from sparsedge.testing import data as sdata
from sparsedge.testing.synthetic import random_transformer, tiny_config
from sparsedge.tokenizer import HFTokenizer, Llama2cTokenizer

from .conftest import need_data

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_bin():
    return need_data(sdata.STORIES260K)


@pytest.fixture(scope="module")
def stories(stories_bin):
    return Session.load(stories_bin, backend="cpu", progress=False)


@pytest.fixture(scope="module")
def tok512():
    return Llama2cTokenizer(need_data(sdata.STORIES260K_TOKENIZER))


@pytest.fixture(scope="module")
def story_text():
    return need_data(sdata.TINYSTORIES_SAMPLE)


@pytest.fixture(scope="module")
def hf_folder(stories_bin, tmp_path_factory):
    return llama2c_to_hf(stories_bin, tmp_path_factory.mktemp("stories260K_hf"))


@pytest.fixture
def no_weight_load(monkeypatch):
    """Fails the test if any weights are built: the error must come before."""
    import sparsedge.loading.build as build

    def boom(*a, **k):
        raise AssertionError("the model's weights were loaded before the bad input was refused")

    monkeypatch.setattr(build, "build_transformer", boom)


def run_cli(args: list, cwd=ROOT, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault(sdata.ENV, str(sdata.data_dir().resolve()))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, timeout=timeout, env=env)


def run_cases(cases: list, prefix: list, header: str) -> None:
    """Run each (args, needles) CLI case (a few at a time) and check its one error line."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        procs = list(pool.map(lambda case: run_cli(prefix + case[0]), cases))
    for (args, needles), proc in zip(cases, procs):
        assert_one_error_line(proc, header, *needles)


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, exactly one `error:` line on stderr naming `needles`, no traceback, no model load."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error: " in ln]
    assert len(lines) == 1, err
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    assert "session ready" not in err, err  # refused before the model's weights were loaded
    return lines[0]


# ---- sampling arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature=None), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"), (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p"),
    (dict(temperature=1.0, top_k=0), "top_k"), (dict(temperature=1.0, top_k=2.5), "top_k"),
    (dict(temperature=1.0, top_k=True), "top_k"),
    (dict(temperature=1.0, seed=1.5), "seed"), (dict(temperature=1.0, seed="7"), "seed"),
    (dict(temperature=1.0, seed=True), "seed"),
])
def test_sampling_params_refuse_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        SamplingParams(**kwargs)


def test_generate_refuses_nonfinite_temperature(stories):
    with pytest.raises(ValueError, match="temperature"):
        stories.generate("Once", max_new_tokens=2, temperature=float("nan"))
    assert SamplingParams(temperature=1, top_k=3, top_p=1, seed=0).temperature == 1.0  # ints still fine


# ---- prompts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,typename", [
    (b"Hello world", "bytes"), (bytearray(b"Hi"), "bytearray"), ([1.0, 2.0], "float"), ([1, True], "bool"),
    ([[1, 2]], "list"), (3, "int"), ({"a": 1}, "dict"), (torch.tensor([1.0]), "float32"),
])
def test_generate_refuses_prompts_that_are_not_str_or_ints(stories, prompt, typename):
    with pytest.raises(TypeError, match=typename):
        stories.generate(prompt, max_new_tokens=2)


def test_generate_accepts_int_sequences(stories):
    import numpy as np

    ref = stories.generate([1, 403], max_new_tokens=3).token_ids
    for ids in ((1, 403), np.array([1, 403]), torch.tensor([1, 403]), range(1, 2)):
        assert len(stories.generate(ids, max_new_tokens=3).token_ids) == 3
    assert stories.generate(np.array([1, 403]), max_new_tokens=3).token_ids == ref


BAD_UTF8 = b"Hello \xff world".decode("utf-8", "surrogateescape")  # what sys.argv holds for such bytes


def test_llama2c_tokenizer_refuses_lone_surrogates(tok512, stories):
    with pytest.raises(ValueError, match="not valid UTF-8.*U\\+DCFF.*0xFF"):
        tok512.encode(BAD_UTF8)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        stories.generate(BAD_UTF8, max_new_tokens=2)
    with pytest.raises(ValueError, match="lone surrogate U\\+D800"):
        tok512.encode("a\ud800b")


def _tiny_hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", bos_token="<s>",
                                               eos_token="</s>"), name="tiny")


def test_hf_tokenizer_refuses_lone_surrogates():
    tok = _tiny_hf_tokenizer()
    assert tok.encode("hello world", add_bos=False) == [3, 4]
    with pytest.raises(ValueError, match="not valid UTF-8.*U\\+DCFF"):
        tok.encode(BAD_UTF8)
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(b"hello")


# ---- the llama2.c tokenizer's merge: same ids as llama2.c's quadratic loop, O(n log n) ------------------

def _reference_merge(tok: Llama2cTokenizer, text: str) -> list[int]:
    """The merge loop as it was (and as llama2.c's run.c has it): rescan all pairs for each merge."""
    tokens = list(tok._piece_ids(b" "))
    for ch in text:
        tokens.extend(tok._piece_ids(ch.encode("utf-8")))
    pieces, lookup, scores = tok.pieces, tok._lookup, tok.scores
    while len(tokens) > 1:
        best_score, best_idx, best_id = None, -1, -1
        for k in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[k]] + pieces[tokens[k + 1]])
            if j is not None and (best_score is None or scores[j] > best_score):
                best_score, best_idx, best_id = scores[j], k, j
        if best_idx < 0:
            break
        tokens[best_idx:best_idx + 2] = [best_id]
    return tokens


def test_llama2c_merge_matches_reference(tok512, story_text):
    text = story_text.read_text(encoding="utf-8")
    rng = random.Random(0)
    samples = ["Once upon a time, there was a little girl named Lily.", "aaaaaaaaaaaaaaaaaaaa", " " * 9,
               "ababababab abab", "héllo wörld, naïve café — 😀 ✓ 中文", "line one\nline two\n\n\ttabbed", "a", "",
               text[:3000]]
    for _ in range(40):
        a = rng.randrange(len(text))
        samples.append(text[a:a + rng.randrange(1, 300)])
    for s in samples:
        assert tok512.encode(s, add_bos=False) == (_reference_merge(tok512, s) if s else []), s


def test_llama2c_encodes_10000_words_fast(tok512, story_text):
    words = story_text.read_text(encoding="utf-8").split()
    text = " ".join((words * (1 + 10000 // len(words)))[:10000])
    t0 = time.perf_counter()
    ids = tok512.encode(text)
    took = time.perf_counter() - t0
    assert took < 5.0, f"10,000 words took {took:.1f} s"  # the quadratic loop took 282 s
    assert tok512.decode(ids) == text


# ---- context length --------------------------------------------------------------------------------------

def test_max_seq_len_above_trained_context_is_refused_before_loading(stories_bin, no_weight_load):
    with pytest.raises(ValueError, match="above the 512 positions .* trained on.*allow_longer_context=True"):
        Session.load(stories_bin, backend="cpu", max_seq_len=2048, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        Session.load(stories_bin, backend="cpu", max_seq_len=0, progress=False)
    with pytest.raises(TypeError, match="max_seq_len must be an integer"):
        Session.load(stories_bin, backend="cpu", max_seq_len=512.0, progress=False)


def test_allow_longer_context_warns(stories_bin):
    with pytest.warns(LongContextWarning, match="above the 512 positions"):
        s = Session.load(stories_bin, backend="cpu", max_seq_len=600, allow_longer_context=True, progress=False)
    assert s.max_seq_len == 600 and issubclass(LongContextWarning, RuntimeWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at the trained context: no warning
        assert Session.load(stories_bin, backend="cpu", max_seq_len=512, progress=False).max_seq_len == 512


def test_context_full_is_a_python_warning(stories_bin):
    s = Session.load(stories_bin, backend="cpu", max_seq_len=12, progress=False)
    with pytest.warns(RuntimeWarning, match="context of 12 tokens is full") as rec:
        r = s.generate([1, 403], max_new_tokens=50)
    assert r.stats.stop_reason == "context_full" and len(r.token_ids) == 11
    assert rec[0].category is ContextFullWarning and rec[0].filename == __file__  # points at the caller
    with pytest.warns(ContextFullWarning):
        list(s.generate([1, 403], max_new_tokens=50, stream=True))


def test_ignore_eos(stories_bin):
    s = Session.load(stories_bin, backend="cpu", progress=False)
    first = s.generate([1], max_new_tokens=1).token_ids[0]
    s.config.eos_token_ids = list(s.config.eos_token_ids or []) + [first]  # make the first greedy token an EOS
    r = s.generate([1], max_new_tokens=6)
    assert r.stats.stop_reason == "eos" and r.token_ids == [first]
    r = s.generate([1], max_new_tokens=6, ignore_eos=True)
    assert r.stats.stop_reason == "max_new_tokens" and len(r.token_ids) == 6 and r.token_ids[0] == first


# ---- artifacts ---------------------------------------------------------------------------------------------

def test_missing_or_empty_predictors_refused_before_loading(stories_bin, tmp_path, no_weight_load):
    with pytest.raises(ArtifactError, match="predictors: no artifact folder"):
        Session.load(stories_bin, backend="cpu", predictors=tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="predictors: .*empty has no manifest.json"):
        Session.load(stories_bin, backend="cpu", predictors=tmp_path / "empty", progress=False)
    with pytest.raises(ArtifactError, match="delta: .*empty has no manifest.json"):
        Session.load(stories_bin, backend="cpu", delta=tmp_path / "empty", progress=False)


def test_artifact_files_have_one_mode(tmp_path):
    model = random_transformer(tiny_config("relu"), seed=1)
    old = os.umask(0o022)
    try:
        out = save_section(tmp_path / "art", model, "ffn", {"a": torch.zeros(3)}, {"s": 1})
        out = save_section(out, model, "delta", {"b": torch.ones(2)}, {"t": 2})  # carries ffn over
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
        assert modes == {"manifest.json": 0o644, "ffn.safetensors": 0o644, "delta.safetensors": 0o644}, modes
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        os.umask(0o077)
        out = save_section(tmp_path / "private", model, "ffn", {"a": torch.zeros(3)}, {"s": 1})
        assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o600}  # the umask still rules
    finally:
        os.umask(old)


def test_check_output(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="--out .*file is a file"):
        check_output(tmp_path / "file")
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "art")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not an artifact folder"):
        check_output(tmp_path / "other")
    assert check_output(tmp_path / "new" / "deeper" / "art") == tmp_path / "new" / "deeper" / "art"
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- corrupt checkpoints -------------------------------------------------------------------------------

def _corrupt_copies(hf_folder: Path, tmp_path: Path) -> dict[str, Path]:
    import shutil

    data = (hf_folder / "model.safetensors").read_bytes()
    variants = {"header too large": struct.pack("<Q", 1 << 40) + data[8:], "truncated": data[: len(data) // 2],
                "not json": data[:8] + b"{not json" + data[17:], "empty": b""}
    out = {}
    for name, blob in variants.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(hf_folder, d)
        (d / "model.safetensors").write_bytes(blob)
        out[name] = d
    return out


def test_corrupt_safetensors_named_when_the_folder_opens(hf_folder, tmp_path):
    open_model(hf_folder)  # the intact one opens
    for name, folder in _corrupt_copies(hf_folder, tmp_path).items():
        with pytest.raises(ModelFormatError, match=r"model\.safetensors is (corrupt|truncated|not a safetensors)"):
            open_model(folder)


# ---- token windows --------------------------------------------------------------------------------------------

def test_token_windows_require(tok512):
    text = "one two three four five six seven eight nine ten eleven twelve"
    n = len(tok512.encode(text, add_bos=False))
    with pytest.raises(TextTooShortError, match=f"holds only {n} tokens, fewer than --tokens 4096") as exc:
        token_windows(tok512, text, 4096, 64, require=True)
    assert exc.value.available == n
    assert sum(len(w) - 1 for w in token_windows(tok512, text, 4096, 64)) == n  # without require: all of it
    assert token_windows(tok512, text, n, 64, require=True)


# ---- the CLIs, as a user runs them ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text(" \n\n\t\n")
    (d / "short.txt").write_text("one two three four five six seven eight nine ten eleven twelve\n")
    (d / "afile").write_text("x")
    (d / "emptydir").mkdir()
    return d


def test_calibrate_bad_inputs(stories_bin, story_text, texts, tmp_path):
    cal = ["tools/calibrate.py", "--model", str(stories_bin)]
    out = str(tmp_path / "art")
    cases = [
        (["--text", str(texts / "missing.txt"), "--out", out], ["--text", "missing.txt", "no such file"]),
        (["--text", str(texts / "empty.txt"), "--out", out], ["--text", "is empty"]),
        (["--text", str(texts / "blank.txt"), "--out", out], ["--text", "is empty"]),
        (["--text", str(story_text), "--out", str(texts / "afile" / "art")], ["--out", "not a folder"]),
        (["--text", str(story_text), "--out", str(texts / "afile")], ["--out", "is a file"]),
        # the 12-word file with the default --tokens: refused, saying how many tokens it holds
        (["--text", str(texts / "short.txt"), "--out", out], ["holds only", "fewer than --tokens 16384",
                                                               "lower --tokens"]),
        (["--text", str(texts / "short.txt"), "--out", out, "--delta", "--no-ffn"],
         ["fewer than --delta-tokens 2048", "lower --delta-tokens"]),
        (["--text", str(story_text), "--out", out, "--predictor", "q4", "--rank", "8"], ["--rank"]),
    ]
    if Path("/proc/self").is_dir():  # a folder nobody may create files in, even root
        cases.append((["--text", str(story_text), "--out", "/proc/self/art", "--tokens", "256"],
                      ["--out", "cannot write in"]))
    run_cases(cases, cal, "calibrate.py: error:")
    assert not Path(out).exists()  # nothing written


def test_calibrate_short_text_after_the_model_loaded_writes_nothing(stories_bin, texts, tmp_path):
    """The same refusal inside the FFN and delta runs (callers that skip the CLI's checks)."""
    import argparse

    from sparsedge.calibrate import delta as dcal
    from sparsedge.calibrate import ffn_cli

    p = argparse.ArgumentParser()
    ffn_cli.add_arguments(p)
    dcal.add_arguments(p)
    for a in ("--model", "--out", "--text", "--dtype"):
        p.add_argument(a)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args(["--model", str(stories_bin), "--out", str(tmp_path / "art"),
                         "--text", str(texts / "short.txt")])
    with pytest.raises(TextTooShortError, match="fewer than --tokens 16384"):
        ffn_cli.run(args)
    with pytest.raises(TextTooShortError, match="fewer than --delta-tokens 2048"):
        dcal.run(args)
    assert not (tmp_path / "art").exists()


def test_eval_bad_inputs(stories_bin, texts):
    ev = ["tools/eval.py", "ppl", "--model", str(stories_bin)]
    short = str(texts / "short.txt")
    cases = [
        (["--text", str(texts / "missing.txt")], ["--text", "no such file"]),
        (["--text", str(texts / "empty.txt")], ["--text", "is empty"]),
        (["--text", short, "--predictors", str(texts / "nope")], ["--predictors", "no artifact folder"]),
        (["--text", short, "--predictors", str(texts / "emptydir")], ["--predictors", "no manifest.json"]),
        (["--text", short, "--delta", str(texts / "emptydir")], ["--delta", "no manifest.json"]),
        (["--text", short, "--seq-len", "1024"], ["trained on", "--allow-longer-context"]),
    ]
    run_cases(cases, ev, "eval.py: error:")


def test_eval_short_text_says_how_many_tokens(stories_bin, texts, tok512):
    proc = run_cli(["tools/eval.py", "ppl", "--model", str(stories_bin), "--text", str(texts / "short.txt"),
                    "--json"])
    assert proc.returncode == 0, proc.stderr.decode()
    n = len(tok512.encode((texts / "short.txt").read_text(), add_bos=False))
    res = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert res["text_tokens"] == n and res["tokens"] == n and res["text_shorter_than_max_tokens"] is True
    assert f"holds only {n} tokens, fewer than --max-tokens 4096" in proc.stderr.decode()


def test_generate_cli_bad_inputs(stories_bin, texts, hf_folder, tmp_path):
    gen = ["-m", "sparsedge.cli", "generate", "--model", str(stories_bin), "--prompt"]
    bad = _corrupt_copies(hf_folder, tmp_path)["header too large"]
    cases = [
        (gen + [b"Hello \xff world"], ["--prompt", "not valid UTF-8", "0xFF"]),
        (gen + ["Hi", "--temperature", "nan"], ["temperature"]),
        (gen + ["Hi", "--temperature", "inf"], ["temperature"]),
        (gen + ["Hi", "--temperature", "0.8", "--top-p", "1.5"], ["top_p"]),
        (gen + ["Hi", "--predictors", str(texts / "nope")], ["--predictors", "no artifact folder"]),
        (gen + ["Hi", "--predictors", str(texts / "emptydir")], ["--predictors", "no manifest.json"]),
        (gen + ["Hi", "--delta", str(texts / "emptydir")], ["--delta", "no manifest.json"]),
        (gen + ["Hi", "--max-seq-len", "4096"], ["512 positions", "--allow-longer-context"]),
        (["-m", "sparsedge.cli", "generate", "--model", str(bad), "--prompt", "Hi"],
         ["model.safetensors", "corrupt"]),
    ]
    run_cases(cases, [], "sparsedge: error:")


def test_generate_cli_prints_text_and_a_summary_line(stories_bin):
    base = ["-m", "sparsedge.cli", "generate", "--model", str(stories_bin), "--prompt", "Once upon a time",
            "--max-new-tokens", "12"]
    proc = run_cli(base)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip()  # the continuation
    summary = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("prompt ")]
    assert len(summary) == 1, proc.stderr.decode()
    line = summary[0]
    assert "12 new tokens" in line and "prefill" in line and "decode" in line and "tok/s" in line
    assert "stop: max_new_tokens" in line
    quiet = run_cli(base + ["--quiet"])
    assert quiet.returncode == 0 and not [ln for ln in quiet.stderr.decode().splitlines() if ln.startswith("prompt ")]
    assert quiet.stdout == proc.stdout  # greedy: the same continuation


def test_generate_cli_ignore_eos(stories_bin, monkeypatch, capsys):
    from sparsedge import cli
    from sparsedge import session as sess

    load = sess.Session.load.__func__

    def load_with_eos(cls, *a, **k):  # the first greedy token after "Once" becomes an end-of-sequence token
        s = load(cls, *a, **k)
        first = s.generate("Once", max_new_tokens=1).token_ids[0]
        s.config.eos_token_ids = list(s.config.eos_token_ids or []) + [first]
        return s

    monkeypatch.setattr(sess.Session, "load", classmethod(load_with_eos))
    args = ["generate", "--model", str(stories_bin), "--prompt", "Once", "--max-new-tokens", "5", "--json"]
    assert cli.main(args) == 0
    stopped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stopped["stats"]["stop_reason"] == "eos" and len(stopped["token_ids"]) == 1
    assert cli.main(args + ["--ignore-eos"]) == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert kept["stats"]["stop_reason"] == "max_new_tokens" and len(kept["token_ids"]) == 5


def test_verbose_keeps_the_traceback(stories_bin, texts):
    proc = run_cli(["-m", "sparsedge.cli", "-v", "generate", "--model", str(stories_bin), "--prompt", "Hi",
                    "--predictors", str(texts / "nope")])
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" in err and "sparsedge: error:" in err


# ---- the extension build ---------------------------------------------------------------------------------------

def test_extension_build_is_incremental_and_parallel(monkeypatch, tmp_path):
    """setup.py's build_ext keeps objects in ./build (ninja then skips unchanged sources) even when pip hands
    it a throw-away build folder, one folder per extension, and compiles with MAX_JOBS = the usable cores."""
    pytest.importorskip("torch.utils.cpp_extension")
    import setuptools
    from setuptools import Distribution

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SPARSEDGE_BUILD_TEMP", raising=False)
    monkeypatch.setenv("MAX_JOBS", "")
    monkeypatch.delenv("MAX_JOBS")  # restored (removed) at teardown: the build sets it
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    build_ext = seen["cmdclass"]["build_ext"]
    assert [e.name for e in seen["ext_modules"]][0] == "sparsedge.backends._cpu_kernels"
    dist = Distribution({"name": "sparsedge", "ext_modules": seen["ext_modules"]})
    dist.get_command_obj("build").build_temp = str(tmp_path / "pip-tmp")  # what an editable install does
    cmd = build_ext(dist)
    cmd.ensure_finalized()
    assert Path(cmd.build_temp).resolve().is_relative_to((ROOT / "build").resolve()), cmd.build_temp
    built = []
    monkeypatch.setattr(type(cmd).__mro__[2], "build_extension", lambda self, ext: built.append(self.build_temp))
    monkeypatch.setattr(type(cmd).__mro__[2], "build_extensions",
                        lambda self: [self.build_extension(e) for e in self.extensions])
    cmd.build_extensions()
    assert built and all(Path(b).parent == Path(cmd.build_temp) for b in built)
    assert Path(built[0]).name == "_cpu_kernels"
    assert os.environ["MAX_JOBS"] == str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count())
