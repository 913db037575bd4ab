"""Safe extraction of one member from a downloaded archive, and archive sources fetched over HTTP."""

from __future__ import annotations

import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from http_server import TestServer
from medseg_cli.errors import MedsegWarning, ModelError
from medseg_cli.weights.archive import extract_member
from test_fetch import cli, clean_env, entry, make_model_bytes, models_json, sha, write_manifest  # noqa: F401

PAYLOAD = b"checkpoint bytes " * 100


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, size, link, 0o644
    return info


def make_tar(path: Path, members: list[tuple], mode: str = "w:gz") -> Path:
    """members: (name, bytes) files, or (name, kind, linkname) for links, dirs and devices."""
    with tarfile.open(path, mode) as archive:
        for member in members:
            if len(member) == 2:
                archive.addfile(_info(member[0], size=len(member[1])), io.BytesIO(member[1]))
            else:
                archive.addfile(_info(member[0], member[1], link=member[2]))
    return path


def test_extracts_the_newest_matching_member(tmp_path):
    archive = make_tar(tmp_path / "models.tar.gz", [
        ("saved_models/", tarfile.DIRTYPE, ""),
        ("saved_models/AFN1/90_checkpoint.pth.tar", b"epoch 90"),
        ("saved_models/AFN1/390_checkpoint.pth.tar", b"epoch 390"),
        ("./saved_models/AFN1/200_checkpoint.pth.tar", b"epoch 200"),
        ("saved_models/AFN2/400_checkpoint.pth.tar", b"other model"),
        ("saved_models/AFN1/latest", tarfile.SYMTYPE, "390_checkpoint.pth.tar"),  # a link inside: allowed
    ])
    out = tmp_path / "out.pth.tar"
    assert extract_member(archive, "saved_models/AFN1/*_checkpoint.pth.tar", out) == \
        "saved_models/AFN1/390_checkpoint.pth.tar"  # numeric order, not text order (90 > 390 as text)
    assert out.read_bytes() == b"epoch 390"
    assert extract_member(archive, "saved_models/AFN1/200_checkpoint.pth.tar", out).endswith("200_checkpoint.pth.tar")
    assert out.read_bytes() == b"epoch 200"
    with pytest.raises(ModelError, match="no member 'saved_models/AFN9/\\*' .*holds: saved_models/AFN1"):
        extract_member(archive, "saved_models/AFN9/*", out)
    with pytest.raises(ModelError, match="'saved_models/AFN1/latest' is a symlink, not a file"):
        extract_member(archive, "saved_models/AFN1/latest", out)

    zipped = tmp_path / "models.zip"
    with zipfile.ZipFile(zipped, "w") as archive_zip:
        archive_zip.writestr("saved_models/AFN1/390_checkpoint.pth.tar", PAYLOAD)
    assert extract_member(zipped, "saved_models/AFN1/*_checkpoint.pth.tar", out) == \
        "saved_models/AFN1/390_checkpoint.pth.tar"
    assert out.read_bytes() == PAYLOAD


UNSAFE_TARS = {
    "parent": [("saved_models/ok.pth", PAYLOAD), ("../evil.txt", PAYLOAD)],
    "nested-parent": [("saved_models/../../evil.txt", PAYLOAD)],
    "absolute": [("/tmp/medseg-evil.txt", PAYLOAD)],
    "symlink-out": [("saved_models/link", tarfile.SYMTYPE, "../../outside"), ("saved_models/ok.pth", PAYLOAD)],
    "symlink-absolute": [("saved_models/passwd", tarfile.SYMTYPE, "/etc/passwd")],
    "hardlink-out": [("saved_models/hard", tarfile.LNKTYPE, "../outside.txt")],
    "device": [("saved_models/dev", tarfile.CHRTYPE, "")],
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TARS))
def test_unsafe_tar_is_refused(tmp_path, case):
    archive = make_tar(tmp_path / "bad.tar.gz", UNSAFE_TARS[case])
    with tarfile.open(archive) as check:  # the hostile names really are in the file
        assert {m.name for m in check.getmembers()} == {m[0] for m in UNSAFE_TARS[case]}
    before = sorted(tmp_path.parent.rglob("*"))
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="refused an unsafe archive") as info:
        extract_member(archive, "saved_models/ok.pth", out)
    assert str(archive) in str(info.value) and "trusted source" in str(info.value)
    assert sorted(tmp_path.parent.rglob("*")) == before and not out.exists()
    assert not Path("/tmp/medseg-evil.txt").exists()


def test_unsafe_zip_and_corrupt_archives_are_refused(tmp_path):
    zipped = tmp_path / "bad.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("saved_models/ok.pth", PAYLOAD)
        archive.writestr("../../evil.txt", PAYLOAD)
    with pytest.raises(ModelError, match="member '../../evil.txt' points outside"):
        extract_member(zipped, "saved_models/ok.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with zipfile.ZipFile(zipped, "w") as archive:
        link = zipfile.ZipInfo("saved_models/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # how Info-ZIP stores a symbolic link
        archive.writestr(link, "../../../etc/passwd")
        archive.writestr("saved_models/ok.pth", PAYLOAD)
    with pytest.raises(ModelError, match="'saved_models/link' is a link to '../../../etc/passwd' outside"):
        extract_member(zipped, "saved_models/ok.pth", tmp_path / "out")

    good = make_tar(tmp_path / "good.tar.gz", [("saved_models/ok.pth", make_model_bytes(0))])
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupt or truncated.*fetch again"):
        extract_member(truncated, "saved_models/ok.pth", tmp_path / "out")


def test_archive_sources_over_http(tmp_path, medseg_home, cli):
    """A model inside a tarball is fetched once, extracted safely; a hostile tarball is refused (exit 3)."""
    model = make_model_bytes(0)
    good = make_tar(tmp_path / "bundle.tar.gz", [("bundle/readme.txt", b"two models"),
                                                 ("bundle/a.onnx", model), ("bundle/b.onnx", make_model_bytes(1))])
    hostile = make_tar(tmp_path / "hostile.tar.gz", [("bundle/a.onnx", model),
                                                     ("bundle/x", tarfile.SYMTYPE, "../../../.bashrc")])
    with TestServer() as server:
        good_url = server.add("/bundle.tar.gz", good.read_bytes())
        hostile_url = server.add("/hostile.tar.gz", hostile.read_bytes())
        manifest = write_manifest(
            tmp_path, entry("a", good_url, sha(good.read_bytes()), member="bundle/a.onnx"),
            entry("b", good_url, sha(good.read_bytes()), member="bundle/b.onnx"),
            entry("evil", hostile_url, sha(hostile.read_bytes()), member="bundle/a.onnx"))
        done = cli("fetch", "a", "b", "--manifest", manifest)
        assert done.returncode == 0, done.stderr
        assert len(server.requests_for("/bundle.tar.gz")) == 1  # one archive download serves both models
        assert (medseg_home / "models" / "a.onnx").read_bytes() == model
        assert (medseg_home / "downloads" / "bundle.tar.gz").read_bytes() == good.read_bytes()
        rows = models_json(cli, manifest)
        assert rows["a"]["status"] == rows["b"]["status"] == "verified" and rows["evil"]["status"] == "missing"

        done = cli("fetch", "evil", "--manifest", manifest)
        assert done.returncode == 3
        assert "refused an unsafe archive" in done.stderr and "'bundle/x' is a link to '../../../.bashrc'" \
            in done.stderr
        assert not (medseg_home / "models" / "evil.onnx").exists()
        assert not any(p.name.startswith(".medseg-partial") for p in (medseg_home / "models").iterdir())
        assert sorted(p.name for p in (medseg_home / "models").iterdir()) == ["a.onnx", "b.onnx"]
        assert not list(tmp_path.rglob(".bashrc")) and not list(tmp_path.rglob("x"))


def test_autofocus_authors_tarball_is_fetched_and_converted(tmp_path, medseg_home, cli):
    """`medseg fetch AFN1` on an authors'-layout models.tar.gz (built here from our own AFN1 with the
    original key names) extracts the newest checkpoint, converts it, and the ONNX model computes what
    the torch model computes."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from exporters.autofocus_original import original_state_dict
    from medseg_cli.card import read_card_from_onnx
    from medseg_cli.weights.manifest import load_manifest
    from medseg_cli.zoo import build_model

    torch.manual_seed(0)
    model = build_model("afn1", 4, 5).eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics, so that a mix-up of buffers shows
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    decoy = build_model("afn1", 4, 5).eval()  # an older epoch: must not be picked
    assert original_state_dict(model)["module.layers.2.convatt1.weight"].shape == (25, 50, 3, 3, 3)  # DIGEST §1.5

    def checkpoint(net, epoch: int) -> bytes:
        state = original_state_dict(net)
        assert all(key.startswith("module.") for key in state)  # DataParallel names, as the authors saved
        buffer = io.BytesIO()
        torch.save({"epoch": epoch, "state_dict": state, "opt_dict": {}}, buffer)
        return buffer.getvalue()

    tarball = make_tar(tmp_path / "models.tar.gz", [
        ("saved_models/", tarfile.DIRTYPE, ""),
        ("saved_models/AFN1/90_checkpoint.pth.tar", checkpoint(decoy, 90)),
        ("saved_models/AFN1/390_checkpoint.pth.tar", checkpoint(model, 390)),
        ("saved_models/Basic/390_checkpoint.pth.tar", checkpoint(build_model("autofocus_basic", 4, 5), 390)),
    ])
    real = json.loads((Path(__file__).resolve().parents[1] / "weights_manifest.json").read_text())
    with TestServer() as server:
        url = server.add("/~yaq007/models.tar.gz", tarball.read_bytes())
        for item in real["models"]:
            for source in item["sources"]:
                source["url"] = url  # the real entries, pointed at the local server
        manifest = tmp_path / "manifest.json"
        manifest.write_text(json.dumps(real))
        done = cli("fetch", "AFN1", "--manifest", manifest)
        assert done.returncode == 0, done.stderr
        assert "no published sha256; trusting it on first use" in done.stderr
        onnx_path = medseg_home / "models" / "AFN1.onnx"
        # the extracted checkpoint and the scratch folder are gone: only the converted model stays
        assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["AFN1.onnx"]
        rows = models_json(cli, manifest)
        assert rows["AFN1"]["status"] == "verified" and rows["AFN2"]["status"] == "missing"
        trust = json.loads((medseg_home / "registry.json").read_text())["trust"][url]
        assert trust["sha256"] == sha(tarball.read_bytes())
        assert len(server.requests_for("/~yaq007/models.tar.gz")) == 1

    card = read_card_from_onnx(onnx_path)
    assert card.name == "AFN1" and card.architecture == "afn1" and card.training.get("epoch") == 390
    assert card.in_channels == 4 and card.channel_names == ["Flair", "T1", "T1c", "T2"] and card.num_classes == 5
    assert card.preprocessing["normalization"]["kind"] == "autofocus"
    assert (card.input_patch, card.output_patch) == ([75, 75, 75], [47, 47, 47])
    entry = load_manifest(manifest).get("AFN1")
    assert card.labels == entry.labels

    x = np.random.default_rng(1).normal(size=(1, 4, 33, 35, 31)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
        decoy_out = decoy(torch.from_numpy(x)).numpy()
    assert onnx_out.shape == torch_out.shape == (1, 5, 5, 7, 3)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=1e-4)
    assert np.abs(decoy_out - torch_out).max() > 1e-2  # the comparison can tell two checkpoints apart


class _Payload:
    """Unpickling this runs code (touches ``marker``): what a tampered checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_authors_checkpoint_is_not_unpickled(tmp_path, medseg_home, monkeypatch):
    """The checkpoint is loaded with weights_only=True: a pickle that would run code is refused (exit 3),
    the code does not run, and nothing is cached."""
    import torch

    from medseg_cli.weights import fetch_model, load_manifest

    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "state_dict": {"module.conv1.weight": torch.zeros(1)}, "opt_dict": _Payload(marker)},
               buffer)
    tarball = make_tar(tmp_path / "models.tar.gz", [("saved_models/AFN1/1_checkpoint.pth.tar", buffer.getvalue())])
    real = json.loads((Path(__file__).resolve().parents[1] / "weights_manifest.json").read_text())
    (afn1,) = [item for item in real["models"] if item["name"] == "AFN1"]
    afn1["sources"][0]["url"] = tarball.as_uri()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"schema_version": 1, "models": [afn1]}))
    with pytest.raises(ModelError, match="cannot read the file as a torch checkpoint") as info, \
            pytest.warns(MedsegWarning, match="no published sha256; trusting it on first use"):
        fetch_model(load_manifest(manifest).get("AFN1"))
    assert info.value.exit_code == 3
    assert not marker.exists()
    assert list((medseg_home / "models").iterdir()) == []
    assert (medseg_home / "downloads" / "models.tar.gz").is_file()  # the archive stays for other models
