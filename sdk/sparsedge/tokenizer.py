"""Tokenizers: one small interface over transformers' tokenizers and llama2.c's `tokenizer.bin`.

`encode(text, add_bos=True)` gives the ids a model is fed; `decode(ids)` gives text back. For
streaming, decode the whole run of generated ids each step and emit the new suffix of the text:
decoding one id at a time loses the spaces some tokenizers only restore from context.
"""
from __future__ import annotations

import heapq
import os
import struct
from pathlib import Path
from typing import Sequence

from loguru import logger


def check_text(text) -> str:
    """`text` if it is a str that can be written as UTF-8; TypeError / ValueError naming the problem otherwise.
    A lone surrogate is what Python makes of bytes that are not UTF-8 on a command line (sys.argv uses
    errors="surrogateescape": byte 0xNN becomes U+DCNN) or in a file read with that error handler."""
    if not isinstance(text, str):
        raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        ch = text[exc.start]
        code = ord(ch)
        origin = (f", which is how Python passes on the byte 0x{code - 0xDC00:02X} of a command line or file that is "
                  f"not UTF-8" if 0xDC80 <= code <= 0xDCFF else "")
        raise ValueError(f"the text is not valid UTF-8: character {exc.start} is the lone surrogate U+{code:04X}"
                         f"{origin}; pass UTF-8 text (check the terminal's or the file's encoding)") from None
    return text


class Tokenizer:
    """Base class (and protocol) of every tokenizer the SDK uses."""

    bos_token_id: int | None = None
    eos_token_ids: list[int]
    vocab_size: int = 0
    name: str = "model"

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of `text` (a BOS first when the model's tokenizer adds one and add_bos). Implementations call
        check_text first: a str that is not valid UTF-8 (lone surrogates) is a ValueError."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def has_chat_template(self) -> bool:
        return False

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise ValueError(f"model {self.name} has no chat template; use generate() with a plain prompt")

    def _no_template(self) -> ValueError:
        return ValueError(f"model {self.name} has no chat template; use generate() with a plain prompt")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------
# transformers tokenizers


class HFTokenizer(Tokenizer):
    """Wraps a transformers tokenizer (from a checkpoint folder or a GGUF file).

    `encode(text)` equals transformers' `tokenizer(text)["input_ids"]`: a BOS is prepended only
    when the transformers tokenizer adds one itself (Llama 2/3 do; SmolLM2 and Qwen2 do not).
    """

    def __init__(self, hf_tokenizer, name: str = "model", extra_eos_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        self.name = name
        self.bos_token_id = hf_tokenizer.bos_token_id
        eos = []
        if hf_tokenizer.eos_token_id is not None:
            eos.append(int(hf_tokenizer.eos_token_id))
        for i in extra_eos_ids:
            if i is not None and int(i) not in eos:
                eos.append(int(i))
        self.eos_token_ids = eos
        self.vocab_size = len(hf_tokenizer)
        # Does the transformers tokenizer add special tokens around plain text, and which?
        probe_with = list(hf_tokenizer("a")["input_ids"])
        probe_without = list(hf_tokenizer("a", add_special_tokens=False)["input_ids"])
        self._adds_bos = (
            self.bos_token_id is not None
            and len(probe_with) > len(probe_without)
            and probe_with[0] == self.bos_token_id
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, gguf_file: str | None = None, name: str | None = None,
                        extra_eos_ids: Sequence[int] = ()) -> "HFTokenizer":
        from transformers import AutoTokenizer

        kw = {"gguf_file": gguf_file} if gguf_file else {}
        logger.debug("loading transformers tokenizer from {} {}", path, kw)
        tok = AutoTokenizer.from_pretrained(str(path), **kw)
        return cls(tok, name=name or Path(path).name, extra_eos_ids=extra_eos_ids)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Same ids as transformers' tokenizer(text) (special tokens added the way it adds them),
        # minus the BOS when add_bos is False.
        check_text(text)
        ids = list(self.hf(text, add_special_tokens=True)["input_ids"])
        if not add_bos and self._adds_bos and ids and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template():
            raise self._no_template()
        out = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        if out and isinstance(out[0], (list, tuple)):
            out = out[0]
        return [int(i) for i in out]


# ----------------------------------------------------------------------------------------------
# llama2.c tokenizer.bin


class Llama2cTokenizer(Tokenizer):
    """The llama2.c `tokenizer.bin` format: int32 max_token_length, then per token a float32
    score, an int32 byte length and the bytes. Ids 0/1/2 are <unk>/<s>/</s>.

    Encoding follows llama2.c: a leading space is prepended ("dummy prefix"), the text is split
    into UTF-8 characters (bytes with no piece of their own become <0xXX> byte tokens, or <unk>),
    then the adjacent pair whose merge has the highest score is merged until none is left.
    Decoding drops the leading space of the piece right after a BOS, as llama2.c does, and turns
    <0xXX> pieces back into raw bytes.
    """

    UNK, BOS, EOS = 0, 1, 2

    def __init__(self, path: str | os.PathLike, vocab_size: int | None = None, name: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"llama2.c tokenizer file not found: {self.path}")
        data = self.path.read_bytes()
        if len(data) < 4:
            raise ValueError(f"{self.path} is too short to be a llama2.c tokenizer.bin")
        (self.max_token_length,) = struct.unpack_from("<i", data, 0)
        pieces: list[bytes] = []
        scores: list[float] = []
        pos = 4
        while pos < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if pos + 8 > len(data):
                raise ValueError(f"{self.path}: truncated entry for token {len(pieces)} at byte {pos}")
            score, n = struct.unpack_from("<fi", data, pos)
            pos += 8
            if n < 0 or pos + n > len(data):
                raise ValueError(f"{self.path}: bad length {n} for token {len(pieces)} at byte {pos - 4}")
            pieces.append(data[pos:pos + n])
            scores.append(score)
            pos += n
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ValueError(f"{self.path} holds {len(pieces)} tokens but the model's vocabulary has {vocab_size}; "
                             "pass the tokenizer that was trained with this checkpoint")
        if len(pieces) < 3:
            raise ValueError(f"{self.path} holds only {len(pieces)} tokens; not a llama2.c tokenizer")
        self.pieces = pieces
        self.scores = scores
        self.vocab_size = len(pieces)
        self.name = name or self.path.stem
        self.bos_token_id = self.BOS
        self.eos_token_ids = [self.EOS]
        # first id wins when a piece is duplicated
        self._lookup: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            self._lookup.setdefault(p, i)
        self._byte_ids: list[int] = []
        self._byte_of_id: dict[int, int] = {}
        for b in range(256):
            i = self._lookup.get(f"<0x{b:02X}>".encode(), -1)
            self._byte_ids.append(i)
            if i >= 0:
                self._byte_of_id[i] = b
        logger.debug("llama2.c tokenizer {}: {} tokens, byte fallback {}", self.path, self.vocab_size,
                     "yes" if self._byte_of_id else "no")

    # -- encode -------------------------------------------------------------------------------
    def _piece_ids(self, chunk: bytes) -> list[int]:
        i = self._lookup.get(chunk)
        if i is not None:
            return [i]
        out = []
        for b in chunk:
            j = self._byte_ids[b]
            out.append(j if j >= 0 else self.UNK)
        return out

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        check_text(text)
        tokens: list[int] = []
        if text:
            tokens.extend(self._piece_ids(b" "))  # dummy prefix, as sentencepiece adds
            for ch in text:
                tokens.extend(self._piece_ids(ch.encode("utf-8")))
            tokens = self._merge(tokens)
        if add_bos:
            tokens.insert(0, self.BOS)
        if add_eos:
            tokens.append(self.EOS)
        return tokens

    def _merge(self, tokens: list[int]) -> list[int]:
        """Merge adjacent pairs, highest score first (the leftmost pair among equal scores), until no pair
        is in the vocabulary: llama2.c's rule, in O(n log n). The symbols form a linked list; a heap holds
        candidate pairs keyed by (-score, position of the left symbol), and entries made stale by a merge are
        skipped when popped (their symbols changed or are gone)."""
        n = len(tokens)
        if n < 2:
            return tokens
        pieces, lookup, scores = self.pieces, self._lookup, self.scores
        ids = list(tokens)
        nxt = list(range(1, n + 1))  # n: end of list
        prv = list(range(-1, n - 1))  # -1: start of list
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int, int]] = []

        def push(a: int, b: int) -> None:
            j = lookup.get(pieces[ids[a]] + pieces[ids[b]])
            if j is not None:
                # a's position in the original sequence orders pairs left to right (a merge keeps the left one)
                heapq.heappush(heap, (-scores[j], a, b, ids[a], ids[b], j))

        for k in range(n - 1):
            push(k, k + 1)
        while heap:
            _, a, b, ida, idb, j = heapq.heappop(heap)
            if not (alive[a] and alive[b] and nxt[a] == b and ids[a] == ida and ids[b] == idb):
                continue  # stale: one of the two symbols was merged since
            ids[a] = j
            alive[b] = False
            c = nxt[b]
            nxt[a] = c
            if c < n:
                prv[c] = a
            if prv[a] >= 0:
                push(prv[a], a)
            if c < n:
                push(a, c)
        out = []
        k = 0
        while k < n:
            out.append(ids[k])
            k = nxt[k]
        return out

    # -- decode -------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        prev = None
        for t in ids:
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary (0..{self.vocab_size - 1})")
            if t in (self.BOS, self.EOS) and skip_special_tokens:
                prev = t
                continue
            if t in self._byte_of_id:
                out.append(self._byte_of_id[t])
            else:
                piece = self.pieces[t]
                if prev == self.BOS and piece.startswith(b" "):
                    piece = piece[1:]
                out += piece
            prev = t
        return out.decode("utf-8", errors="replace")

    def has_chat_template(self) -> bool:
        return False

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise self._no_template()


def find_llama2c_tokenizer(model_path: str | os.PathLike, vocab_size: int | None = None) -> Path | None:
    """The `tok*.bin` beside a llama2.c checkpoint (or inside a folder): the one named tok{V}.bin
    when there are several, None when there is none."""
    p = Path(model_path)
    folder = p if p.is_dir() else p.parent
    found = sorted(f for f in folder.glob("tok*.bin") if f.is_file() and f.resolve() != p.resolve())
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    if vocab_size is not None:
        exact = [f for f in found if f.name == f"tok{vocab_size}.bin"]
        if exact:
            return exact[0]
    if any(f.name == "tokenizer.bin" for f in found):
        return next(f for f in found if f.name == "tokenizer.bin")
    raise ValueError(f"several llama2.c tokenizers beside {p}: {', '.join(f.name for f in found)}; "
                     "pass the right one with tokenizer=PATH")


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None, name: str | None = None,
                   extra_eos_ids: Sequence[int] = ()) -> Tokenizer:
    """A tokenizer from an explicit path: a llama2.c `.bin`, a `.gguf` file, or a transformers folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    if p.is_file() and p.suffix == ".bin":
        return Llama2cTokenizer(p, vocab_size=vocab_size, name=name)
    if p.is_file() and p.suffix == ".gguf":
        return HFTokenizer.from_pretrained(p.parent, gguf_file=p.name, name=name, extra_eos_ids=extra_eos_ids)
    if p.is_dir():
        return HFTokenizer.from_pretrained(p, name=name, extra_eos_ids=extra_eos_ids)
    if p.is_file() and p.name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        return HFTokenizer.from_pretrained(p.parent, name=name, extra_eos_ids=extra_eos_ids)
    raise ValueError(f"cannot tell what kind of tokenizer {p} is: pass a llama2.c tok*.bin, a .gguf file, "
                     "or a folder with a transformers tokenizer (tokenizer.json / tokenizer.model)")
