"""The op table on every device: each parity case of the op schema (the CASES of sdk/sparsedge/ops/*.py, built by
sparsedge.testing.opcases) runs on the CPU fused kernels, on the CUDA kernels when a GPU is visible, and on the
AscendC kernels under the host-emulation harness (ascendc_ops/emulation; 310B and 910B tilings), each compared with
the composite reference. Per device, the registered fused kernels are exactly the ops the device claims.

Item ids read `<device>-<op>-<case>`: `-k npu910B`, `-k "cpu and delta"` select. Devices: cpu (always), cuda
(skipped, with the reason, when torch.cuda.is_available() is false), npu310B / npu910B (fp16 / fp16 + bf16; skipped
without g++, failing under CI=true). The emulator runs the kernel sources on the host, one block after another:
cases above its work budget (`Device.max_work`) run there only under `-m slow`, like the large shapes everywhere.
Nothing here ran on an NPU; the CUDA items only run on a GPU machine.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from sparsedge import ops
from sparsedge.activations import ACTIVATIONS
from sparsedge.backends import get_backend
from sparsedge.backends.npu import NPU_KERNEL_OPS
from sparsedge.testing import opcases
from sparsedge.testing.opcases import REFERENCE, Runtime, Tol

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def missing(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


class Device(NamedTuple):
    name: str  # item id prefix
    kind: str  # "cpu" | "cuda" | "npu": what Case.devices names
    dtypes: tuple
    ops: frozenset  # the ops this device claims a fused kernel for
    rtol: dict  # dtype -> rtol of float outputs (the policy: sparsedge.testing.opcases)
    band: float  # decisions on fp32 sums may flip within band * scale of their boundary
    exact: bool  # elementwise results (the delta buffers) bit-identical to the reference's
    max_work: float = float("inf")  # cases above it run only under -m slow
    chip: str | None = None


ALL_OPS = frozenset(ops.op_names())
DEVICES = [
    # sequential / 8-lane fp32 sums: ~1e-6 relative, as the reference's own matmuls
    Device("cpu", "cpu", (F32, F16, BF16), ALL_OPS, {F32: 1e-5, F16: 3e-3, BF16: 2e-2}, 1e-5, True),
    # warp-tree sums, then one rounding to fp16 / bf16 (2 ulp)
    Device("cuda", "cuda", (F32, F16, BF16), ALL_OPS, {F32: 1e-4, F16: 2e-3, BF16: 1.6e-2}, 1e-3, False),
    # fp16 / bf16 inputs, fp32 vector sums (the q4 predictor's estimates too; the reference's are fp64)
    *[Device(f"npu{chip}", "npu", dts, frozenset(NPU_KERNEL_OPS), {F16: 2e-3, BF16: 2e-2}, 1e-4, True, 6e6, chip)
      for chip, dts in (("310B", (F16,)), ("910B", (F16, BF16)))],
]
# ops whose kernel computes another formula than the reference: delta attention sums q.d_j token by token where
# the reference reconstructs k_hat by a cumsum first, so fp32 agrees to 1e-4, not to the device's summation noise
RTOL_FLOOR = {"delta_attention": 1e-4}
CASES = opcases.all_cases()
PROGRAMS = {(c.op, c.id): opcases.build(c) for c in CASES if opcases.has_program(c.op)}
CUDA_MISSING = None if torch.cuda.is_available() else "no CUDA GPU visible (torch.cuda.is_available() is False)"


def supports(dev: Device, case) -> bool:
    return (case.op in dev.ops and case.dtype in dev.dtypes and (case.devices is None or dev.kind in case.devices))


def _items():
    out = []
    for case in CASES:
        if (case.op, case.id) not in PROGRAMS:
            continue  # test_every_op_has_cases_and_a_program names it
        work = PROGRAMS[case.op, case.id].work
        for dev in DEVICES:
            if not supports(dev, case):
                continue
            marks = [pytest.mark.slow] if case.slow or work > dev.max_work else []
            if dev.kind == "cuda":
                marks.append(pytest.mark.gpu)
                if CUDA_MISSING:
                    marks.append(pytest.mark.skip(reason=CUDA_MISSING))
            out.append(pytest.param(dev, case, marks=marks, id=f"{dev.name}-{case.op}-{case.id}"))
    return out


# ----------------------------------------------------------------------------------------------- runtimes
@functools.lru_cache(maxsize=None)
def _cpu_ready():
    err = get_backend("cpu").kernel_error
    return f"CPU kernel library not built ({err}); pip install --no-build-isolation -e ." if err else None


@functools.lru_cache(maxsize=None)
def _cuda_ready():
    if torch.version.cuda is None:
        return "torch is a CPU build: the CUDA extension cannot have been built"
    try:
        import sparsedge.backends._cuda_kernels  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"sparsedge.backends._cuda_kernels failed to import ({exc}); build it with "
                    f"`pip install --no-build-isolation -e .` on this machine")
    return None


@functools.lru_cache(maxsize=None)
def _emu():
    """The host-emulation harness module (ascendc_ops/emulation/emu.py)."""
    spec = importlib.util.spec_from_file_location("sparsedge_ascend_testutil",
                                                  ROOT / "ascendc_ops" / "emulation" / "testutil.py")
    tu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tu)
    return tu.emu_module()


class NPUWorker:
    """The NPU device: ascendc_ops/emulation/npu_worker.py in a subprocess (the real binding built against a fake
    torch_npu, launching the emulated kernels), started on the first NPU item. Inputs and outputs go through files."""
    SOCS = {"310B": "Ascend310B4", "910B": "Ascend910B1"}

    def __init__(self):
        self.proc, self.registered, self.saved, self.dir = None, None, None, None

    def start(self):
        emu = _emu()
        if emu.compiler() is None:
            missing("no g++ to build the fake-NPU binding and the emulated AscendC kernels")
        lib = emu.build_fake_binding()
        self.dir = self.dir or Path(tempfile.mkdtemp(prefix="sparsedge-npu-"))
        self.saved = None
        self.log = open(self.dir / "stderr.txt", "w+")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "ascendc_ops" / "emulation" / "npu_worker.py"),
                                      str(lib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        self.registered = set(self._read()["registered"])

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.proc.wait()
        self.log.seek(0)
        self.proc = None
        pytest.fail(f"the NPU worker died:\n{self.log.read()[-4000:]}")

    def run(self, case, chip: str, cores: int, inputs: dict) -> dict:
        if self.proc is None:
            self.start()
        if self.saved != (case.op, case.id):  # both chips run the same inputs
            torch.save(inputs, self.dir / "inputs.pt")
            self.saved = (case.op, case.id)
        req = dict(op=case.op, id=case.id, soc=self.SOCS[chip], cores=cores, inputs=str(self.dir / "inputs.pt"),
                   outputs=str(self.dir / "outputs.pt"))
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        res = self._read()
        if "error" in res:
            raise (ValueError if res["error"] == "ValueError" else RuntimeError)(res["message"])
        return torch.load(self.dir / "outputs.pt")

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


NPU = NPUWorker()


@pytest.fixture(scope="module", autouse=True)
def _npu_worker():
    yield
    NPU.close()


def _fused(kind: str):
    def op(name):
        assert ops.has_fused(name, kind), f"no fused {kind} kernel registered for sparsedge::{name}"
        return getattr(torch.ops.sparsedge, name)
    return op


def run_on(dev: Device, case, prog, inputs) -> dict:
    """The case's program on `dev` (outputs on the CPU). cores: CPU threads, NPU cores (the CUDA grid ignores it)."""
    cores = case.params.get("cores")
    if dev.kind == "npu":
        return NPU.run(case, dev.chip, cores or 4, inputs)
    if dev.kind == "cuda":
        if _cuda_ready():
            missing(_cuda_ready())
        return opcases.to_cpu(prog.run(Runtime("cuda", _fused("cuda"), lambda t: t.cuda()), inputs))
    if _cpu_ready():
        missing(_cpu_ready())
    prev = torch.get_num_threads()
    torch.set_num_threads(cores or prev)
    try:
        return prog.run(Runtime("cpu", _fused("cpu")), inputs)
    finally:
        torch.set_num_threads(prev)


_LAST: dict = {}


def _inputs_and_want(case):
    """The case's inputs and reference outputs, computed once: items run case by case, so every device reuses them."""
    key = (case.op, case.id)
    if key not in _LAST:
        prog = PROGRAMS[key]
        inputs = prog.make()
        _LAST.clear()
        _LAST[key] = inputs, (None if case.raises else opcases.to_cpu(prog.run(REFERENCE, inputs)))
    return _LAST[key]


@pytest.mark.parametrize("dev,case", _items())
def test_op(dev: Device, case):
    prog = PROGRAMS[case.op, case.id]
    inputs, want = _inputs_and_want(case)
    if case.raises:
        with pytest.raises((RuntimeError, ValueError), match=case.raises):
            run_on(dev, case, prog, inputs)
        return
    got = run_on(dev, case, prog, inputs)
    rtol = max(dev.rtol[case.dtype], RTOL_FLOOR.get(case.op, 0.0) if case.dtype == F32 else 0.0)
    prog.check(got, want, Tol(rtol, dev.band, dev.exact))


# ------------------------------------------------------------------------------------------------ the table
def test_every_op_has_cases_and_a_program():
    covered = {c.op for c in CASES}
    assert ALL_OPS <= covered, f"ops without parity cases (add them to their module's CASES): {sorted(ALL_OPS - covered)}"
    assert covered <= ALL_OPS, f"cases of unknown ops: {sorted(covered - ALL_OPS)}"
    missing_programs = sorted({c.op for c in CASES if not opcases.has_program(c.op)})
    assert not missing_programs, f"no @program in sparsedge/testing/opcases.py for {missing_programs}"
    ids = [(c.op, c.id) for c in CASES]
    assert len(ids) == len(set(ids)), "two cases of one op share an id (their params are equal)"
    for c in CASES:
        assert c.devices is None or set(c.devices) <= {"cpu", "cuda", "npu"}, c


def test_cpu_sparse_ffn_independent_of_threads_and_batching():
    """The CPU kernel's per-element arithmetic never depends on the split: per token == batched, 1 thread == all."""
    if _cpu_ready():
        missing(_cpu_ready())
    cases = [c for c in CASES if c.op == "sparse_ffn" and c.params.get("invariance")]
    assert cases
    for case in cases:
        i = PROGRAMS[case.op, case.id].make()
        p, args = case.params, [i[k] for k in ("x", "p1", "p2", "bias", "wg", "wu", "wd")]
        act = (p["act"], p.get("act_param", 0.0), p.get("tau", 0.0))
        y = torch.ops.sparsedge.sparse_ffn(*args, *act)[0]
        per_token = [torch.ops.sparsedge.sparse_ffn(args[0][t:t + 1], *args[1:], *act)[0] for t in range(p["T"])]
        assert torch.equal(torch.cat(per_token), y), case.id
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(torch.ops.sparsedge.sparse_ffn(*args, *act)[0], y), case.id
        finally:
            torch.set_num_threads(prev)


# ------------------------------------------------------------------------- registered kernels == claimed ops
def impl_names(*sources: Path) -> set[str]:
    return {name for src in sources for name in re.findall(r'm\.impl\("(\w+)"', src.read_text())}


def test_cpu_kernels_are_the_schema():
    """Every op has a fused CPU kernel, and the CPU library registers nothing outside the schema."""
    assert impl_names(*(ROOT / "backends" / "cpu").glob("*.cpp")) == ALL_OPS
    if _cpu_ready():
        missing(_cpu_ready())
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
                  if n.startswith(f"{ops.NAMESPACE}::")}
    assert registered == ALL_OPS, f"missing: {sorted(ALL_OPS - registered)}; unknown: {sorted(registered - ALL_OPS)}"


def test_cuda_kernels_are_the_schema():
    """The cuda_ops/*.cpp bindings register a CUDA kernel for exactly the schema's ops (read from the sources; and from
    the dispatcher once the extension is loaded on a GPU machine)."""
    bindings = sorted((ROOT / "cuda_ops").glob("*.cpp"))
    assert all("TORCH_LIBRARY_IMPL(sparsedge, CUDA, m)" in b.read_text() for b in bindings)
    registered = impl_names(*bindings)
    assert registered == ALL_OPS, f"missing: {sorted(ALL_OPS - registered)}; unknown: {sorted(registered - ALL_OPS)}"
    if CUDA_MISSING:
        return
    if _cuda_ready():
        missing(_cuda_ready())
    assert not [n for n in ALL_OPS if not ops.has_fused(n, "cuda")]


def test_npu_kernels_are_the_schema():
    """sparsedge.backends.npu.NPU_KERNEL_OPS is what the binding registers for PrivateUse1 (source, build info, and the
    dispatcher of the worker that loads the fake-NPU build of the binding: the build the NPU items run on)."""
    assert set(NPU_KERNEL_OPS) <= ALL_OPS
    binding = ROOT / "ascendc_ops" / "binding" / "torch_binding.cpp"
    assert impl_names(binding) == set(NPU_KERNEL_OPS)
    info = re.search(r'"ops=([\w,]+)', binding.read_text()).group(1)
    assert set(info.split(",")) == set(NPU_KERNEL_OPS), "sparsedge_ascend_build_info() lists other ops"
    if NPU.proc is None:
        NPU.start()
    assert NPU.registered == set(NPU_KERNEL_OPS), (
        f"PrivateUse1 kernels {sorted(NPU.registered)} != NPU_KERNEL_OPS {sorted(NPU_KERNEL_OPS)}")


# --------------------------------------------------------------------------------------- activation names
def test_activation_header_matches_python():
    """backends/include/sparsedge/activations.h (parsed by every C++ binding) lists ACTIVATIONS, in order."""
    text = (ROOT / "backends" / "include" / "sparsedge" / "activations.h").read_text()
    enum = re.search(r"enum class Activation\s*:\s*int\s*\{([^}]*)\}", text).group(1)
    members = [(m.group(1), int(m.group(2))) for m in re.finditer(r"(\w+)\s*=\s*(\d+)", enum)]
    assert [name for name, _ in members] == list(ACTIVATIONS)
    assert [value for _, value in members] == list(range(len(ACTIVATIONS)))
    names = re.search(r"kActivationNames\[\]\s*=\s*\{([^}]*)\}", text).group(1)
    assert re.findall(r'"(\w+)"', names) == list(ACTIVATIONS)
