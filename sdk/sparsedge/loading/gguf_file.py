"""A GGUF file, read directly: header, metadata and tensor directory parsed in one pass, tensor data mapped.

Nothing is copied or dequantized: `tensor(name)` is a zero-copy uint8 view [rows, row_bytes] of the mapped
file (the GGUF block bytes as llama.cpp wrote them), or a float view for F32/F16/BF16. The map is private
copy-on-write, so views are writable without touching the file and pages are read only when used.

Every structural problem (bad magic, unknown version, a string or array running past the end, a tensor whose
data lies beyond the end of the file, an unsupported tensor type) raises GGUFError naming the file and what
is wrong, before any weight is touched.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsedge.loading.base import ModelFormatError
from sparsedge.quant import load_only
from sparsedge.quant.formats import FLOAT_DTYPES, SUPPORTED, UnsupportedQuantError, get_format, qtype_from_ggml


class GGUFError(ModelFormatError):
    """A file that is not a readable GGUF (truncated, corrupt, unsupported)."""


# metadata value types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


def _ggml_name(t: int) -> str:
    try:
        from gguf import GGMLQuantizationType
        return GGMLQuantizationType(t).name
    except (ImportError, ValueError):
        return f"ggml type {t}"


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: (rows, ..., K); GGUF lists the fastest dimension first
    qtype: str
    offset: int  # from the start of the file
    nbytes: int


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF ({what} at byte {self.pos} needs {n} bytes, the "
                            f"file has {len(self.buf)}); re-download or re-convert the file")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _NUMPY:
                size = np.dtype(_NUMPY[etype]).itemsize * count
                self.need(size, what)
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += size
                return arr
            if etype == _STRING:
                return self._strings(count, what)
            return [self.value(etype, what) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype} ({what}); the file is corrupt or from a "
                        f"newer GGUF version")

    def _strings(self, count: int, what: str) -> list[str]:
        """A string array (a vocabulary: ~50k entries) with one bounds check per entry and no per-entry calls."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = pos
                self.need(n, what)
            out.append(bytes(buf[pos:pos + n]))
            pos += n
        self.pos = pos
        return [b.decode("utf-8", errors="replace") for b in out]


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file {self.path} not found")
        self._file = open(self.path, "rb")
        size = self.path.stat().st_size
        if size < 24:
            raise GGUFError(f"{self.path}: {size} bytes is too short for a GGUF header; the file is truncated")
        # private (copy-on-write: views are writable, the file never is); MAP_POPULATE maps every page of the file
        # at once instead of one fault per 4 KiB page on first touch (~17k faults for a 70 MB copy at load)
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
        self._map = mmap.mmap(self._file.fileno(), 0, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        buf = memoryview(self._map)
        cur = _Cursor(buf, self.path)
        if bytes(buf[:4]) != b"GGUF":
            raise GGUFError(f"{self.path} does not start with the GGUF magic bytes; not a GGUF file")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (versions 2 and 3 are)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.scalar("<I", f"type of {key}")
            self.metadata[key] = cur.value(vtype, key)
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            nd = cur.scalar("<I", f"dimensions of {name}")
            dims = [cur.scalar("<Q", f"shape of {name}") for _ in range(nd)]
            ggml_type = cur.scalar("<I", f"type of {name}")
            offset = cur.scalar("<Q", f"offset of {name}")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            try:
                if ggml_type in load_only.BY_GGML:  # dequantized when read (sparsedge.quant.load_only)
                    fmt = load_only.BY_GGML[ggml_type]
                    qtype = fmt.name
                else:
                    qtype = qtype_from_ggml(ggml_type)
                    fmt = get_format(qtype)
            except UnsupportedQuantError:
                raise GGUFError(f"{self.path}: tensor {name!r} is stored as {_ggml_name(ggml_type)}, which sparsedge "
                                f"cannot run; supported types: {', '.join(SUPPORTED + tuple(load_only.FORMATS))} "
                                f"(requantize the file with "
                                f"llama.cpp's llama-quantize to one of them)") from None
            k = shape[-1]
            if k % fmt.block:
                raise GGUFError(f"{self.path}: tensor {name!r} has rows of {k} values, not a multiple of the "
                                f"{qtype} block size {fmt.block}; the file is corrupt")
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            nbytes = rows * (k // fmt.block) * fmt.type_size
            start = data_start + offset
            if start + nbytes > size:
                raise GGUFError(f"{self.path} is truncated: tensor {name!r} needs bytes {start}..{start + nbytes} but "
                                f"the file has {size} bytes; re-download the file")
            self.tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a zero-copy uint8 tensor [rows, row_bytes] (1-D tensors: [1, bytes])."""
        info = self.tensors[name]
        t = torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return t.view(rows, info.nbytes // rows)

    def tensor(self, name: str) -> torch.Tensor:
        """F32/F16/BF16 tensors as float views in their shape; quantized ones as raw() bytes."""
        info = self.tensors[name]
        if info.qtype in FLOAT_DTYPES:
            return self.raw(name).view(FLOAT_DTYPES[info.qtype]).view(info.shape)
        return self.raw(name)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # views still alive: the map stays open until they are gone
            pass
        self._file.close()
