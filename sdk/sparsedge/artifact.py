"""Calibration artifacts: a folder of safetensors sections plus one JSON manifest.

    art/
      manifest.json        {"format_version": 1,
                            "model": {name, fingerprint, n_layers, dim, intermediate_size, n_heads,
                                      n_kv_heads, head_dim},
                            "sections": {"ffn": {...meta...}, "delta": {...}},
                            "files": {"ffn": {"file": "ffn.safetensors", "bytes": N, "sha256": "..."}, ...}}
      ffn.safetensors      tensors of the "ffn" section
      delta.safetensors    tensors of the "delta" section

`save_section` writes one section and carries every other section of an existing folder over, so the
FFN predictors and the delta-attention thresholds can be calibrated separately into one folder. The
folder is built complete under a temporary name beside the target and then renamed into place, so a
crash never leaves a half-written artifact. `load_section` refuses, with an `ArtifactError` that names
the problem and what to do, anything that does not belong to the model it is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from loguru import logger

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHAPE_KEYS = ("n_layers", "dim", "intermediate_size", "n_heads", "n_kv_heads", "head_dim")


class ArtifactError(ValueError):
    """An artifact folder that is missing, corrupt, of another format version or for another model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model) -> str:
    """Identity hash of a model's weights (config + a strided sample of every tensor): an artifact belongs to
    the weights it was calibrated on. With a delta key scale folded into q/k (sparsedge.delta.balance) it is
    the hash of the unscaled weights, which the fold recorded before touching them."""
    if getattr(model, "key_scale", None) is not None and getattr(model, "unscaled_fingerprint", None):
        return model.unscaled_fingerprint
    from sparsedge.quant.qweight import dequantized

    hsh = hashlib.sha256(model.config.to_json().encode())
    # quantized weights hash as their dequantized values: the same file hashes alike loaded either way
    tensors = [model.tok_embeddings, model.norm]
    for layer in model.layers:
        dense = getattr(layer.ffn, "dense", layer.ffn)
        down_t = dense.w_down_t if dense.w_down_t is not None else dequantized(dense.w_down).t()
        tensors += [layer.attention.wqkv, layer.attention.wo, dense.w_gate_up, down_t]
    for t in map(dequantized, tensors):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        hsh.update(str(tuple(t.shape)).encode())
        # rounded to bf16 so the same weights hash alike whatever dtype they were loaded in
        hsh.update(flat[::step].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return hsh.hexdigest()[:32]


def model_identity(model) -> dict:
    cfg = model.config
    ident = {"name": cfg.name, "fingerprint": weights_fingerprint(model)}
    ident.update({k: int(getattr(cfg, k)) for k in _SHAPE_KEYS})
    return ident


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def read_manifest(path) -> dict:
    """The parsed manifest of an artifact folder (format version checked); ArtifactError otherwise."""
    folder = Path(path)
    if not folder.exists():
        raise ArtifactError(f"no artifact folder at {folder}; create one with "
                            f"`python tools/calibrate.py --model M --out {folder} --text FILE`")
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an artifact folder (expected a folder holding {MANIFEST}); "
                            f"pass the folder written by tools/calibrate.py --out")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not an artifact folder, or an interrupted write; "
                            f"re-run tools/calibrate.py --out {folder}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt or truncated ({exc}); re-run tools/calibrate.py "
                            f"--out {folder} to rebuild the artifact") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ArtifactError(f"{mpath} is not a sparsedge manifest (no format_version); re-run "
                            f"tools/calibrate.py --out {folder}")
    ver = manifest["format_version"]
    if ver != FORMAT_VERSION:
        raise ArtifactError(f"{mpath} has format version {ver!r}, this sparsedge reads version {FORMAT_VERSION}; "
                            f"re-calibrate with this version (tools/calibrate.py) or use the sparsedge release "
                            f"that wrote it")
    for key in ("model", "sections"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{mpath} lacks its {key!r} entry (corrupt manifest); re-run tools/calibrate.py "
                                f"--out {folder}")
    return manifest


def check_artifact(path, section: str, what: str = "artifact") -> dict:
    """Cheap check before a model loads: `path` is an artifact folder whose manifest lists `section`
    ("ffn" for predictors, "delta"). `what` names the input in the message (e.g. "--predictors"). Returns the
    manifest; ArtifactError otherwise. (That it fits the model is checked once the model is loaded.)"""
    try:
        manifest = read_manifest(path)
    except ArtifactError as exc:
        raise ArtifactError(f"{what}: {exc}") from None
    if section not in manifest["sections"]:
        have = ", ".join(sorted(manifest["sections"])) or "none"
        flag = "--delta" if section == "delta" else ""
        raise ArtifactError(f"{what}: artifact {path} has no {section!r} section (it holds: {have}); calibrate it "
                            f"into this folder with tools/calibrate.py {flag + ' ' if flag else ''}--out {path}")
    return manifest


def check_output(out, what: str = "--out") -> Path:
    """Before any work: `out` can become an artifact folder. It is an artifact folder, an empty folder or
    absent, and the folder it lives in is writable (a temporary file is created and removed there, as
    save_section will write a temporary folder beside it). ArtifactError naming `what` otherwise."""
    import tempfile

    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"{what} {out} is a file, not an artifact folder; choose another {what}")
        if any(out.iterdir()):
            try:
                read_manifest(out)
            except ArtifactError as exc:
                raise ArtifactError(f"{what} {out} exists and is not an artifact folder ({exc}); remove it or choose "
                                    f"another {what}") from None
    parent = out.absolute().parent
    while not parent.exists():  # save_section creates missing parents
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"{what} {out}: {parent} is a file, not a folder; choose another {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ArtifactError(f"{what} {out}: cannot write in {parent} ({exc.strerror or exc}); choose a writable "
                            f"{what}") from None
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_model(manifest: dict, model, folder: Path) -> None:
    want = manifest["model"]
    cfg = model.config
    diffs = [f"{k} {want.get(k)} vs {getattr(cfg, k)}" for k in _SHAPE_KEYS
             if want.get(k) is not None and int(want.get(k)) != int(getattr(cfg, k))]
    if diffs:
        raise ArtifactError(f"artifact {folder} was calibrated for a model of other shapes "
                            f"({'; '.join(diffs)}; artifact vs loaded model {cfg.name!r}); calibrate this "
                            f"model with tools/calibrate.py --model ... --out NEW_DIR")
    fp = weights_fingerprint(model)
    if want.get("fingerprint") != fp:
        raise ArtifactError(f"artifact {folder} belongs to another model (fingerprint {want.get('fingerprint')} "
                            f"of {want.get('name')!r}, the loaded {cfg.name!r} has {fp}); predictors only fit the "
                            f"weights they were calibrated on: calibrate this model with tools/calibrate.py")


def load_section(path, model, section: str):
    """(tensors, meta) of `section`, or None when the folder has no such section."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    manifest = read_manifest(folder)
    _check_model(manifest, model, folder)
    if section not in manifest["sections"]:
        return None
    finfo = manifest.get("files", {}).get(section, {"file": f"{section}.safetensors"})
    fpath = folder / finfo["file"]
    if not fpath.is_file():
        raise ArtifactError(f"{folder}: section {section!r} is listed in the manifest but {fpath.name} is missing; "
                            f"re-run its calibration into this folder")
    if "bytes" in finfo and fpath.stat().st_size != finfo["bytes"]:
        raise ArtifactError(f"{fpath} is truncated or corrupt ({fpath.stat().st_size} bytes, the manifest says "
                            f"{finfo['bytes']}); re-run the calibration of section {section!r}")
    if "sha256" in finfo and _sha256(fpath) != finfo["sha256"]:
        raise ArtifactError(f"{fpath} is corrupt (checksum differs from the manifest); re-run the calibration "
                            f"of section {section!r}")
    try:
        tensors = load_file(str(fpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{fpath} is not a readable safetensors file ({exc}); re-run the calibration of "
                            f"section {section!r}") from None
    return tensors, manifest["sections"][section]


def save_section(out_dir, model, section: str, tensors: dict, meta: dict) -> Path:
    """Write `section` into the artifact folder `out_dir` (atomically; other sections are kept)."""
    from safetensors.torch import save_file

    if not section or "/" in section or section.startswith("."):
        raise ValueError(f"bad section name {section!r}")
    out = Path(out_dir)
    ident = model_identity(model)
    keep_sections, keep_files = {}, {}
    if out.exists():
        try:
            old = read_manifest(out)
        except ArtifactError as exc:
            if out.is_dir() and not any(out.iterdir()):
                old = None  # an empty folder: fine to fill
            else:
                raise ArtifactError(f"refusing to overwrite {out}: it exists but is not a valid artifact ({exc}); "
                                    f"remove it or choose another --out") from None
        if old is not None:
            if old["model"].get("fingerprint") != ident["fingerprint"]:
                raise ArtifactError(f"refusing to add section {section!r} to {out}: that folder holds an artifact "
                                    f"of another model ({old['model'].get('name')!r}); choose another --out")
            keep_sections = {k: v for k, v in old["sections"].items() if k != section}
            keep_files = {k: v for k, v in old.get("files", {}).items() if k in keep_sections}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name, finfo in keep_files.items():
            shutil.copy2(out / finfo["file"], tmp / finfo["file"])
        fname = f"{section}.safetensors"
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(clean, str(tmp / fname), metadata={"section": section, "format_version": str(FORMAT_VERSION)})
        files = dict(keep_files)
        files[section] = {"file": fname, "bytes": (tmp / fname).stat().st_size, "sha256": _sha256(tmp / fname)}
        sections = dict(keep_sections)
        sections[section] = _jsonable(meta)
        manifest = {"format_version": FORMAT_VERSION, "model": ident, "sections": sections, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False))
        # one mode for every file, as a plain write makes it (0644 under the usual umask 022); safetensors writes
        # its files 0600, and the temporary folder is created like any folder (0755 under umask 022)
        mask = _umask()
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if out.exists():
            old_dir = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old_dir)
            os.rename(tmp, out)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"wrote section {section!r} ({len(tensors)} tensors) to {out}")
    return out
