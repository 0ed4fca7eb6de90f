"""Tokenizers: llama2.c tokenizer.bin (tok512) and the transformers wrapper (SmolLM2 GGUF)."""
from __future__ import annotations

import struct

import pytest

try:
    from .conftest import need_data, smollm2_gguf
except ImportError:  # tests/ run as a plain folder
    from conftest import need_data, smollm2_gguf
from sparsedge.testing import data as sdata
from sparsedge.tokenizer import HFTokenizer, Llama2cTokenizer, find_llama2c_tokenizer, load_tokenizer

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello world",
    "  two leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "héllo wörld, naïve café — 😀 ✓ 中文",
    "a",
]


@pytest.fixture(scope="module")
def tok512():
    return Llama2cTokenizer(need_data(sdata.STORIES260K_TOKENIZER))


# ---- llama2.c tokenizer ------------------------------------------------------------------------

def test_llama2c_basics(tok512):
    assert tok512.vocab_size == 512
    assert tok512.bos_token_id == 1 and tok512.eos_token_ids == [2]
    assert not tok512.has_chat_template()
    with pytest.raises(ValueError, match="has no chat template; use generate\\(\\) with a plain prompt"):
        tok512.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("text", TEXTS)
def test_llama2c_round_trip(tok512, text):
    ids = tok512.encode(text)
    assert ids[0] == 1
    assert tok512.decode(ids) == text
    # without BOS, the ids start with the dummy-prefix space, and decoding keeps it
    no_bos = tok512.encode(text, add_bos=False)
    assert no_bos == ids[1:]
    assert tok512.decode(no_bos) == " " + text


@pytest.mark.parametrize("text", TEXTS[:4])
def test_llama2c_pieces_cover_text_and_merge(tok512, text):
    """Pieces concatenate to ' ' + text (the dummy prefix), and merging leaves far fewer tokens
    than characters; no adjacent pair is left that the vocabulary could still merge."""
    ids = tok512.encode(text, add_bos=False)
    raw = b"".join(bytes([tok512._byte_of_id[i]]) if i in tok512._byte_of_id else tok512.pieces[i] for i in ids)
    assert raw == (" " + text).encode()
    assert len(ids) < len(text) or len(text) <= 2
    for a, b in zip(ids, ids[1:]):
        assert tok512.pieces[a] + tok512.pieces[b] not in tok512._lookup


def test_llama2c_byte_fallback(tok512):
    ids = tok512.encode("😀", add_bos=False)
    byte_ids = [i for i in ids if i in tok512._byte_of_id]
    assert bytes(tok512._byte_of_id[i] for i in byte_ids) == "😀".encode()
    assert tok512.decode(ids) == " 😀"


def test_llama2c_empty_and_special(tok512):
    assert tok512.encode("") == [1]
    assert tok512.encode("", add_bos=False) == []
    assert tok512.decode([1, 2]) == ""
    assert tok512.encode("hi", add_eos=True)[-1] == 2
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok512.decode([512])


def test_llama2c_bad_files(tmp_path):
    src = need_data(sdata.STORIES260K_TOKENIZER)
    with pytest.raises(ValueError, match="holds 512 tokens but the model's vocabulary has 600"):
        Llama2cTokenizer(src, vocab_size=600)
    cut = tmp_path / "tok_cut.bin"
    cut.write_bytes(src.read_bytes()[:1001])
    with pytest.raises(ValueError, match="truncated|bad length"):
        Llama2cTokenizer(cut)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Llama2cTokenizer(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.bin")


def test_find_llama2c_tokenizer(tmp_path):
    model = tmp_path / "m.bin"
    model.write_bytes(b"")
    assert find_llama2c_tokenizer(model) is None
    (tmp_path / "tok512.bin").write_bytes(b"")
    assert find_llama2c_tokenizer(model).name == "tok512.bin"
    (tmp_path / "tok32000.bin").write_bytes(b"")
    assert find_llama2c_tokenizer(model, vocab_size=32000).name == "tok32000.bin"
    with pytest.raises(ValueError, match="pass the right one with tokenizer=PATH"):
        find_llama2c_tokenizer(model)


# ---- transformers tokenizers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_auto_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_hf_tokenizer_matches_transformers(smol_auto_tokenizer):
    tok = HFTokenizer(smol_auto_tokenizer, name="smollm2")
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == smol_auto_tokenizer.bos_token_id
    assert smol_auto_tokenizer.eos_token_id in tok.eos_token_ids
    for text in TEXTS:
        want = list(smol_auto_tokenizer(text)["input_ids"])
        assert tok.encode(text) == want, text
        assert tok.encode(text, add_bos=False) == want  # SmolLM2 adds no BOS
        assert tok.decode(want) == text


def test_hf_tokenizer_chat_template(smol_auto_tokenizer):
    tok = HFTokenizer(smol_auto_tokenizer, name="smollm2")
    assert tok.has_chat_template()
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ids = tok.apply_chat_template(msgs)
    ref = smol_auto_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert ids == list(ref)
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert len(tok.apply_chat_template(msgs, add_generation_prompt=False)) < len(ids)


def _bos_adding_tokenizer():
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_hf_tokenizer_bos_handling():
    hf = _bos_adding_tokenizer()
    tok = HFTokenizer(hf, name="tiny")
    assert tok.encode("hello world") == list(hf("hello world")["input_ids"]) == [1, 3, 4]
    assert tok.encode("hello world", add_bos=False) == [3, 4]
    assert tok.eos_token_ids == [2]
    assert not tok.has_chat_template()
    with pytest.raises(ValueError, match="model tiny has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])


def test_llama2c_tokenizer_file_format_roundtrip(tmp_path):
    """A hand-written tokenizer.bin (no byte tokens): unknown characters become <unk>."""
    pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0), (b" ", -1.0), (b"a", -2.0),
              (b"b", -3.0), (b" a", -0.5), (b" ab", -0.1)]
    blob = struct.pack("<i", 3) + b"".join(struct.pack("<fi", s, len(p)) + p for p, s in pieces)
    path = tmp_path / "tok8.bin"
    path.write_bytes(blob)
    tok = Llama2cTokenizer(path)
    assert tok.vocab_size == 8
    assert tok.encode("ab") == [1, 7]
    assert tok.encode("abz", add_bos=False) == [7, 0]
    assert tok.decode([1, 7, 5]) == "abb"
