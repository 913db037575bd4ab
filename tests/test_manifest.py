"""The weights manifest: the real weights_manifest.json is valid, and the validator catches mistakes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from medseg_cli.card import ModelCard
from medseg_cli.errors import ModelError
from medseg_cli.weights.manifest import (FORMATS, default_manifest_path, load_manifest, parse_manifest,
                                         validate_manifest)

REPO_MANIFEST = Path(__file__).resolve().parents[1] / "weights_manifest.json"
AUTOFOCUS = ("Basic", "ASPP_c", "ASPP_s", "AFN1", "AFN2", "AFN3", "AFN4", "AFN5", "AFN6")


@pytest.fixture()
def real_data() -> dict:
    return json.loads(REPO_MANIFEST.read_text(encoding="utf-8"))


def test_real_manifest_is_valid(real_data, monkeypatch):
    monkeypatch.delenv("MEDSEG_MANIFEST", raising=False)
    assert default_manifest_path().resolve() in (REPO_MANIFEST, Path(__file__).resolve().parents[1]
                                                 / "medseg_cli" / "weights_manifest.json")
    assert validate_manifest(real_data) == []
    manifest = load_manifest(REPO_MANIFEST)
    names = [name.lower() for name in manifest.names()]
    assert len(names) == len(set(names)) and len(names) == len(real_data["models"])
    for entry in manifest.entries:
        assert entry.sources, entry.name
        for source in entry.sources:
            assert source.url and source.format in FORMATS
            assert source.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", source.sha256)
            assert source.size is None or source.size > 0
        # the card fields a manifest entry carries build a valid ModelCard for its labels and channels
        ModelCard(name=entry.name, architecture=entry.architecture, in_channels=len(entry.modalities),
                  num_classes=len(entry.labels), channel_names=entry.modalities, labels=entry.labels, **entry.card)
        assert sorted(int(k) for k in entry.labels) == list(range(len(entry.labels)))


def test_real_manifest_lists_the_autofocus_models(real_data):
    manifest = parse_manifest(real_data)
    for name in AUTOFOCUS:
        entry = manifest.get(name)
        (source,) = entry.sources
        assert source.url == "http://cseweb.ucsd.edu/~yaq007/models.tar.gz"  # the seed README's address
        assert source.format == "autofocus-original" and source.sha256 is None  # trust on first use
        assert source.member == f"saved_models/{name}/*_checkpoint.pth.tar"
        assert entry.modalities == ["Flair", "T1", "T1c", "T2"] and len(entry.labels) == 5
        assert entry.card["input_patch"] == [75, 75, 75] and entry.card["output_patch"] == [47, 47, 47]
        assert entry.architecture == {"Basic": "autofocus_basic", "ASPP_c": "autofocus_aspp_c",
                                      "ASPP_s": "autofocus_aspp_s"}.get(name, name.lower())


def test_manifest_architectures_are_zoo_models(real_data):
    """Converters build the entry's ``architecture`` from the zoo: it must be a registered name."""
    from medseg_cli.zoo import list_models

    known = {model.name for model in list_models()}
    for entry in parse_manifest(real_data).entries:
        assert entry.architecture in known, (entry.name, entry.architecture, sorted(known))


def test_packaged_sources_resolve_inside_the_package(real_data, tmp_path):
    """`package:` sources point into the installed medseg_cli folder and pin their sha256."""
    from medseg_cli.weights import Cache, model_status, package_path, sha256_file

    package_root = Path(__import__("medseg_cli").__file__).resolve().parent
    for entry in parse_manifest(real_data).entries:
        for source in entry.sources:
            if source.scheme == "package":  # e.g. the default model, medseg_cli/models/hippocampus.onnx
                path = package_path(source)
                assert package_root in path.parents and path.is_file(), path
                assert sha256_file(path) == source.sha256
                assert model_status(entry, cache=Cache(tmp_path))[0] == "verified"

    # the scheme itself, on a file that is certainly in the package
    card_py = package_root / "card.py"
    data = {"schema_version": 1, "models": [{
        "name": "packaged", "description": "d", "architecture": "a", "task": "t", "labels": {"0": "background"},
        "modalities": ["CT"], "licence": "l", "citation": "c",
        "sources": [{"url": "package:card.py", "sha256": sha256_file(card_py), "format": "onnx"}]}]}
    entry = parse_manifest(data).get("packaged")
    assert package_path(entry.sources[0]) == card_py
    from medseg_cli.weights import fetch_model

    result = fetch_model(entry, cache=Cache(tmp_path))
    assert result.status == "packaged" and result.path == card_py
    assert model_status(entry, cache=Cache(tmp_path)) == ("verified", card_py)
    assert not list(tmp_path.glob("models/*"))  # nothing was copied into the cache


def _valid() -> dict:
    return {"schema_version": 1, "models": [{
        "name": "m1", "description": "d", "architecture": "unet3d", "task": "t",
        "labels": {"0": "background", "1": "x"}, "modalities": ["CT"], "licence": "l", "citation": "c",
        "card": {"input_patch": [32, 32, 32]},
        "sources": [{"url": "https://example.org/m1.onnx", "sha256": "a" * 64, "size": 10, "format": "onnx"}]}]}


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["models"].append(copy.deepcopy(d["models"][0]) | {"name": "M1"}), "listed twice"),
    (lambda d: d["models"][0]["sources"][0].update(sha256="ABC"), "64 lower-case hex digits or null"),
    (lambda d: d["models"][0]["sources"][0].update(sha256="A" * 64), "64 lower-case hex digits or null"),
    (lambda d: d["models"][0]["sources"][0].pop("url"), "lacks 'url'"),
    (lambda d: d["models"][0]["sources"][0].pop("format"), "lacks 'format'"),
    (lambda d: d["models"][0]["sources"][0].pop("sha256"), "lacks 'sha256'"),
    (lambda d: d["models"][0]["sources"][0].update(format="keras"), "format 'keras' is not one of"),
    (lambda d: d["models"][0]["sources"][0].update(url="ftp://x/m1.onnx"), "scheme 'ftp' is not one of"),
    (lambda d: d["models"][0]["sources"][0].update(url="package:../../etc/passwd"), "relative inside the package"),
    (lambda d: d["models"][0]["sources"][0].update(url="package:models/m.onnx", sha256=None), "must pin its sha256"),
    (lambda d: d["models"][0]["sources"][0].update(member="a/b.pth"), "the url is not an archive"),
    (lambda d: d["models"][0]["sources"][0].update(url="https://x/a.tar.gz", member="../b"),
     "relative path inside the archive"),
    (lambda d: d["models"][0]["sources"][0].update(format="autofocus-original"), "needs 'member'"),
    (lambda d: d["models"][0]["sources"][0].update(size=-1), "non-negative integer"),
    (lambda d: d["models"][0]["sources"][0].update(mirror="x"), "unknown keys ['mirror']"),
    (lambda d: d["models"][0].update(sources=[]), "non-empty list"),
    (lambda d: d["models"][0].update(name="a b"), "letters, digits"),
    (lambda d: d["models"][0].pop("licence"), "lacks 'licence'"),
    (lambda d: d["models"][0].update(labels={"background": "0"}), "label values as strings"),
    (lambda d: d["models"][0].update(modalities=[]), "non-empty list of channel names"),
    (lambda d: d["models"][0].update(card={"patch": [1]}), "not model-card fields"),
    (lambda d: d["models"][0].update(weights="x"), "unknown keys ['weights']"),
    (lambda d: d.update(schema_version=2), "schema_version must be 1"),
])
def test_validator_reports_each_mistake(mutate, expected):
    data = _valid()
    assert validate_manifest(data) == []
    mutate(data)
    problems = validate_manifest(data)
    assert any(expected in problem for problem in problems), problems


def test_load_manifest_errors_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON") as info:
        load_manifest(bad)
    assert str(bad) in str(info.value)
    data = _valid()
    data["models"][0]["sources"][0]["sha256"] = "xyz"
    data["models"][0].pop("task")
    bad.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"invalid weights manifest: .*lacks 'task'.*64 lower-case hex"):
        load_manifest(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_valid()))
    monkeypatch.setenv("MEDSEG_MANIFEST", str(good))
    assert default_manifest_path() == good and load_manifest().names() == ["m1"]
    with pytest.raises(ModelError, match="unknown model 'm2'.*Known models: m1"):
        load_manifest().get("m2")
    monkeypatch.setenv("MEDSEG_MANIFEST", str(tmp_path / "absent.json"))
    with pytest.raises(ModelError, match="cannot read the weights manifest.*MEDSEG_MANIFEST"):
        load_manifest()
