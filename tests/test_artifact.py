"""Artifact folder: round trip, carry-over of other sections, and every refusal."""
import json

import pytest
import torch

from sparsedge.artifact import FORMAT_VERSION, ArtifactError, load_section, read_manifest, save_section, weights_fingerprint
from sparsedge.testing.synthetic import random_transformer, tiny_config


@pytest.fixture(scope="module")
def model():
    return random_transformer(tiny_config("relu"), seed=1)


@pytest.fixture
def art(tmp_path, model):
    t = {"layers.0.p1": torch.randn(4, 64), "layers.0.bias": torch.arange(5.0)}
    return save_section(tmp_path / "art", model, "ffn", t, {"rank": [4], "s": 0.8}), t


def test_round_trip(art, model):
    path, t = art
    tensors, meta = load_section(path, model, "ffn")
    assert meta == {"rank": [4], "s": 0.8}
    assert set(tensors) == set(t) and all(torch.equal(tensors[k], t[k]) for k in t)
    m = read_manifest(path)
    assert m["format_version"] == FORMAT_VERSION
    assert m["model"]["fingerprint"] == weights_fingerprint(model)
    assert m["model"]["intermediate_size"] == 192 and m["model"]["n_kv_heads"] == 2
    assert load_section(path, model, "delta") is None


def test_sections_carried_over(art, model):
    path, t = art
    save_section(path, model, "delta", {"theta": torch.ones(3, 2)}, {"window": 64})
    assert set(read_manifest(path)["sections"]) == {"ffn", "delta"}
    assert torch.equal(load_section(path, model, "ffn")[0]["layers.0.bias"], t["layers.0.bias"])
    save_section(path, model, "ffn", {"x": torch.zeros(2)}, {"rank": [8]})  # recalibrate one section
    assert load_section(path, model, "delta")[1] == {"window": 64}
    assert load_section(path, model, "ffn")[1] == {"rank": [8]}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_missing_folder(tmp_path, model):
    with pytest.raises(ArtifactError, match="no artifact folder"):
        load_section(tmp_path / "nope", model, "ffn")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_section(tmp_path / "empty", model, "ffn")


def test_corrupt_json(art, model):
    path, _ = art
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load_section(path, model, "ffn")


def test_truncated_safetensors(art, model):
    path, _ = art
    f = path / "ffn.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ArtifactError, match="truncated"):
        load_section(path, model, "ffn")


def test_corrupt_safetensors_same_size(art, model):
    path, _ = art
    f = path / "ffn.safetensors"
    b = bytearray(f.read_bytes())
    b[-1] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(ArtifactError, match="corrupt"):
        load_section(path, model, "ffn")


def test_unreadable_safetensors_without_checksums(art, model):
    path, _ = art
    m = json.loads((path / "manifest.json").read_text())
    m["files"]["ffn"] = {"file": "ffn.safetensors"}  # no size/checksum recorded: the reader must still refuse
    (path / "manifest.json").write_text(json.dumps(m))
    f = path / "ffn.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ArtifactError, match="safetensors"):
        load_section(path, model, "ffn")


def test_other_model_fingerprint(art):
    path, _ = art
    other = random_transformer(tiny_config("relu"), seed=2)
    with pytest.raises(ArtifactError, match="another model"):
        load_section(path, other, "ffn")
    with pytest.raises(ArtifactError, match="another model"):
        save_section(path, other, "delta", {}, {})


def test_other_shapes(art):
    path, _ = art
    other = random_transformer(tiny_config("relu", intermediate_size=128), seed=1)
    with pytest.raises(ArtifactError, match="other shapes.*intermediate_size 192 vs 128"):
        load_section(path, other, "ffn")


def test_unknown_version(art, model):
    path, _ = art
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_section(path, model, "ffn")


def test_refuses_to_overwrite_non_artifact(tmp_path, model):
    d = tmp_path / "stuff"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        save_section(d, model, "ffn", {}, {})
    assert (d / "keep.txt").exists()
