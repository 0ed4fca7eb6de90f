"""TEST HARNESS loader: builds the host-emulated AscendC kernels (launch_emu.cpp + the kernel sources, compiled by
g++ against emulation/kernel_operator.h) into a shared library cached by source hash, and wraps it with ctypes.

Nothing here runs on an NPU or replaces CANN; it lets CI execute the kernel sources' logic (tiling, queues,
alignment, compaction, accumulation order) on the host and compare with sparsedge's composite reference.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from sparsedge.activations import ACTIVATIONS

ROOT = Path(__file__).resolve().parents[1]  # ascendc_ops/
SHARED_INCLUDE = ROOT.parent / "backends" / "include"  # sparsedge/activations.h, shared by every C++ binding
SOURCES = [
    ROOT / "emulation" / "kernel_operator.h",
    ROOT / "emulation" / "launch_emu.cpp",
    ROOT / "include" / "sparsedge_tiling.h",
    ROOT / "host" / "sparsedge_tiling.cpp",
    ROOT / "include" / "sparsedge_launch.h",
    ROOT / "kernels" / "sparsedge_kernel_common.h",
    ROOT / "kernels" / "sparse_ffn.cpp",
    ROOT / "kernels" / "delta_attention.cpp",
    ROOT / "kernels" / "qffn.cpp",
    ROOT / "emulation" / "harness_selftest.cpp",
    SHARED_INCLUDE / "sparsedge" / "activations.h",
]
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wno-unused-function"]
CHIPS = {"310B": 0, "910B": 1}
DTYPES = {torch.float16: 0, torch.bfloat16: 1}
ACT_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}  # the kernels' ids (static_assert'ed in launch_emu.cpp)
MODES = {"fused": 0, "rows": 1, "predict": 2}


def cache_dir() -> Path:
    d = Path(os.environ.get("SPARSEDGE_CACHE", Path.home() / ".cache" / "sparsedge")) / "ascend_emu"
    d.mkdir(parents=True, exist_ok=True)
    return d


def source_hash(extra: list[Path] = (), flags: list[str] = ()) -> str:
    h = hashlib.sha256()
    for p in list(SOURCES) + list(extra):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(list(CXXFLAGS) + list(flags)).encode())
    return h.hexdigest()[:16]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build(out_name: str, sources: list[Path], flags: list[str], extra_hash: list[Path] = ()) -> Path:
    """Compile `sources` into a cached .so keyed by the hash of every input; returns its path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    key = source_hash(list(sources) + list(extra_hash), flags)
    target = cache_dir() / f"{out_name}-{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp_out = Path(tmp) / target.name
        cmd = [cxx, *CXXFLAGS, *flags, "-I", str(ROOT / "emulation"), "-I", str(SHARED_INCLUDE), *map(str, sources),
               "-o", str(tmp_out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emulation build failed: {' '.join(cmd)}\n{res.stderr[-6000:]}")
        os.replace(tmp_out, target)
    return target


class SdFfnTiling(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("blockDim", "dPad", "rPad", "nPerCore", "nTile", "p2Rows", "ubBytes",
                                               "ubLimit")] + [("wsBytes", ctypes.c_uint64)] + \
               [(n, ctypes.c_uint32) for n in ("redBlockDim", "redCols", "redUbBytes")]


class SdFfnQ4Tiling(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("blockDim", "dPad", "hPad", "ngPad", "nPerCore", "nTile", "qRows",
                                               "ubBytes", "ubLimit")] + [("wsBytes", ctypes.c_uint64)] + \
               [(n, ctypes.c_uint32) for n in ("concatBlockDim", "concatUbBytes")]


class SdQffnTiling(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("blockDim", "bPerCore", "nbxPad", "nTile", "nList", "ubBytes",
                                               "ubLimit")] + [("wsBytes", ctypes.c_uint64)] + \
               [(n, ctypes.c_uint32) for n in ("redBlockDim", "redCols", "redUbBytes")]


class SdDeltaEncodeTiling(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("blockDim", "dPad", "maxTokens", "ubBytes", "ubLimit")]


class SdDeltaAttnTiling(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("blockDim", "dPad", "G", "chunk", "entTile", "ubBytes", "ubLimit")] + \
               [("wsBytes", ctypes.c_uint64), ("nPad", ctypes.c_uint32)]


def _as_dict(s: ctypes.Structure) -> dict:
    return {name: getattr(s, name) for name, _ in s._fields_}


def _p(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


class Emu:
    """ctypes face of the emulated kernels. Tensors must be contiguous CPU tensors."""

    def __init__(self, path: Path | None = None):
        self.path = path or build("sparsedge_ascend_emu", [ROOT / "emulation" / "launch_emu.cpp", ROOT / "host" / "sparsedge_tiling.cpp",
                                                    ROOT / "emulation" / "harness_selftest.cpp"], [])
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.sd_emu_last_error.restype = ctypes.c_char_p
        self.lib.sd_emu_launch_log.restype = ctypes.c_char_p
        self.lib.sd_chip_ub_bytes.restype = ctypes.c_uint32
        self.lib.sd_harness_message.restype = ctypes.c_char_p

    def harness_case(self, which: int, chip: str = "310B") -> str | None:
        """Run one harness self-test case; returns the harness's error message, or None when accepted."""
        rc = self.lib.sd_harness_case(which, CHIPS[chip])
        return self.lib.sd_harness_message().decode() if rc else None

    # ---- tiling (the C++ functions the binding uses)
    def ub_bytes(self, chip: str) -> int:
        return self.lib.sd_chip_ub_bytes(CHIPS[chip])

    def ffn_tiling(self, chip, mode, T, d, r, I, cores, elem_bytes=2):
        t = SdFfnTiling()
        rc = self.lib.sd_ffn_tiling(CHIPS[chip], MODES[mode], T, d, r, I, elem_bytes, cores, ctypes.byref(t))
        return rc, _as_dict(t)

    def ffn_q4_tiling(self, chip, T, d, G, I, cores, elem_bytes=2):
        t = SdFfnQ4Tiling()
        rc = self.lib.sd_ffn_q4_tiling(CHIPS[chip], T, d, G, I, elem_bytes, cores, ctypes.byref(t))
        return rc, _as_dict(t)

    def qffn_rows_q8_tiling(self, chip, T, d, I, cores):
        t = SdQffnTiling()
        rc = self.lib.sd_qffn_rows_q8_tiling(CHIPS[chip], T, d, I, cores, ctypes.byref(t))
        return rc, _as_dict(t)

    def delta_encode_tiling(self, chip, T, H, D, cores, elem_bytes=2):
        t = SdDeltaEncodeTiling()
        rc = self.lib.sd_delta_encode_tiling(CHIPS[chip], T, H, D, elem_bytes, cores, ctypes.byref(t))
        return rc, _as_dict(t)

    def delta_attn_tiling(self, chip, H, Hq, D, n, cores, elem_bytes=2):
        t = SdDeltaAttnTiling()
        rc = self.lib.sd_delta_attn_tiling(CHIPS[chip], H, Hq, D, n, elem_bytes, cores, ctypes.byref(t))
        return rc, _as_dict(t)

    def _check(self, rc):
        if rc != 0:
            raise RuntimeError(self.lib.sd_emu_last_error().decode())

    # ---- ops
    def ffn(self, mode, x, w_gate, w_up, w_down_t, *, p1=None, p2=None, bias=None, idx=None, count=None,
            activation="relu", act_param=0.0, tau=0.0, chip="310B", cores=4):
        T, d = x.shape
        I = w_gate.shape[0]
        r = p1.shape[0] if p1 is not None else 0
        y = torch.empty_like(x)
        idx_out = torch.full((T, I), -1, dtype=torch.int32)
        count_out = torch.zeros(T, dtype=torch.int32)
        down = torch.zeros(T, dtype=torch.int32)
        ub = (ctypes.c_uint64 * 2)()
        bias32 = bias.float().contiguous() if bias is not None else None
        rc = self.lib.sd_emu_ffn(
            CHIPS[chip], DTYPES[x.dtype], MODES[mode], cores, _p(x), _p(p1), _p(p2), _p(bias32), _p(w_gate), _p(w_up),
            _p(w_down_t), _p(idx), _p(count), T, d, r, I, ACT_IDS[activation], ctypes.c_float(act_param),
            ctypes.c_float(tau), _p(y), _p(idx_out), _p(count_out), _p(down), ub)
        self._check(rc)
        return {"y": y, "idx": idx_out, "count": count_out, "down_count": down, "ub": (ub[0], ub[1])}

    def ffn_predict_q4(self, x, q, scale, thresh, *, activation="silu", act_param=0.0, chip="310B", cores=4):
        """x [T, d] fp16/bf16, q uint8 [I, 2, d/2], scale fp32 [I, 2, d/G], thresh fp32 [I] -> idx, count, ub."""
        T, d = x.shape
        I, G = q.shape[0], d // scale.shape[2]
        idx = torch.full((T, I), -1, dtype=torch.int32)
        count = torch.zeros(T, dtype=torch.int32)
        ub = (ctypes.c_uint64 * 2)()
        q, scale, thresh = q.contiguous(), scale.float().contiguous(), thresh.float().contiguous()
        rc = self.lib.sd_emu_ffn_q4(CHIPS[chip], DTYPES[x.dtype], cores, _p(x), _p(q), _p(scale), _p(thresh), T, d, G,
                                    I, ACT_IDS[activation], ctypes.c_float(act_param), _p(idx), _p(count), ub)
        self._check(rc)
        return {"idx": idx, "count": count, "ub": (ub[0], ub[1])}

    def qffn_rows_q8(self, x, idx, count, w_gate_up, codes, scale, *, activation="silu", act_param=0.0,
                     chip="310B", cores=4):
        """qsparse_ffn_rows with q8_0 gate/up and W_down (kernels/qffn.cpp): x [T, d] (any float dtype; the kernel
        reads fp32, as the binding converts), idx int32 [T, I], count int32 [T], w_gate_up uint8 [2I, d/32*34],
        codes int8 [I, d], scale fp16 [I/32, d] -> y fp32 [T, d], down_count int32 [T], ub."""
        T, d = x.shape
        I = codes.shape[0]
        x32 = x.float().contiguous()
        y = torch.empty(T, d, dtype=torch.float32)
        down = torch.zeros(T, dtype=torch.int32)
        ub = (ctypes.c_uint64 * 2)()
        args = [t.contiguous() for t in (idx, count, w_gate_up, codes, scale)]
        rc = self.lib.sd_emu_qffn_rows_q8(CHIPS[chip], cores, _p(x32), *map(_p, args), T, d, I, ACT_IDS[activation],
                                          ctypes.c_float(act_param), _p(y), _p(down), ub)
        self._check(rc)
        return {"y": y, "down_count": down, "ub": (ub[0], ub[1])}

    def delta_encode(self, k, ref, theta, values, chan, offsets, start, *, chip="310B", cores=4):
        T, H, D = k.shape
        status = (ctypes.c_int32 * 8)()
        ub = (ctypes.c_uint64 * 1)()
        rc = self.lib.sd_emu_delta_encode(
            CHIPS[chip], DTYPES[k.dtype], cores, _p(k), _p(ref), _p(theta), _p(values), _p(chan), _p(offsets), T, H,
            D, values.shape[1], offsets.shape[1], start, status, ub)
        self._check(rc)
        return {"status": list(status), "ub": ub[0]}

    def delta_attention(self, q, k, v_cache, values, chan, offsets, sink_k, window_k, start, n_sink, window, scale,
                        *, chip="310B", cores=4):
        _, Hq, D = q.shape
        H = k.shape[1]
        out = torch.empty_like(q)
        ub = (ctypes.c_uint64 * 1)()
        rc = self.lib.sd_emu_delta_attention(
            CHIPS[chip], DTYPES[q.dtype], cores, _p(q), _p(k), _p(v_cache), _p(values), _p(chan), _p(offsets),
            _p(sink_k), _p(window_k), _p(out), H, Hq, D, v_cache.shape[1], values.shape[1], sink_k.shape[1],
            window_k.shape[1], start, n_sink, window, ctypes.c_float(scale), ub)
        self._check(rc)
        return {"out": out, "ub": ub[0]}

    def launch_log(self) -> list[str]:
        return [line for line in self.lib.sd_emu_launch_log().decode().splitlines() if line]

    def clear_log(self):
        self.lib.sd_emu_clear_log()


def torch_flags() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension as ce
    inc = [f"-I{p}" for p in ce.include_paths()]
    lib = [f"-L{p}" for p in ce.library_paths()] + [f"-Wl,-rpath,{p}" for p in ce.library_paths()]
    return inc, lib + ["-ltorch", "-ltorch_cpu", "-lc10"]


BINDING = ROOT / "binding" / "torch_binding.cpp"
FAKE_DIR = ROOT / "emulation" / "fake_torch_npu"


def build_fake_binding() -> Path:
    """TEST HARNESS: binding/torch_binding.cpp built with -DSPARSEDGE_FAKE_NPU against the fake OpCommand /
    NPUStream / acl headers and the emulated launchers, linked with CPU torch. Loading it registers the real
    PrivateUse1 implementations; called on CPU tensors (redispatch to PrivateUse1) they marshal arguments, compute
    tiling, and 'launch' the emulated kernels. Cached by the hash of every input and the torch version."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    fakes = sorted(FAKE_DIR.rglob("*.h"))
    extras = ROOT / "emulation" / "fake_binding_extras.cpp"
    key = source_hash([BINDING, extras, *fakes], [torch.__version__])
    target = cache_dir() / f"sparsedge_fake_binding-{key}.so"
    if target.exists():
        return target
    inc, libs = torch_flags()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        common = ["-O1", "-fPIC", "-c", f"-I{FAKE_DIR}", f"-I{ROOT / 'include'}", f"-I{ROOT / 'emulation'}",
                  f"-I{SHARED_INCLUDE}"]
        units = [
            (BINDING, ["-std=c++20", "-DSPARSEDGE_FAKE_NPU", *inc]),
            (ROOT / "emulation" / "launch_emu.cpp", ["-std=c++17", "-O2"]),  # the kernels: tests/test_ops.py runs them
            (ROOT / "host" / "sparsedge_tiling.cpp", ["-std=c++17"]),
            (extras, ["-std=c++20"]),
        ]
        objs = []
        for src, flags in units:
            obj = tmp / (src.stem + ".o")
            cmd = [cxx, *common, *flags, str(src), "-o", str(obj)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"fake binding build failed: {' '.join(cmd)}\n{res.stderr[-6000:]}")
            objs.append(str(obj))
        out = tmp / target.name
        cmd = [cxx, "-shared", *objs, *libs, "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"fake binding link failed: {' '.join(cmd)}\n{res.stderr[-6000:]}")
        os.replace(out, target)
    return target
