"""Signed model folders: tledge export's signer (OpenSSF model-signing) and the runtime's verifier, on real keys and
real files, checked against model_signing's own verifier; every refusal names the file or the key."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest
from fleet_testkit import checked_model, make_key, sign

from tledge_export.errors import ExportError
from tledge_runtime import Classifier
from tledge_runtime.cli import main
from tledge_runtime.errors import SignatureError, TledgeError
from tledge_runtime.repository.keys import load_trusted_keys
from tledge_runtime.repository.signature import MAX_SIGNATURE_BYTES, verify_folder


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {"fleet": make_key(d, "fleet"), "other": make_key(d, "other"), "p384": make_key(d, "p384", "secp384r1")}


@pytest.fixture
def signed(tmp_path, keys) -> Path:
    folder = tmp_path / "7"
    checked_model(folder / "model.onnx", 7)
    (folder / "labels.txt").write_text("red\ngreen\nblue\n")
    sign(folder, keys["fleet"][0])
    return folder


def _trusted(keys, *names):
    return load_trusted_keys([keys[n][1] for n in names])


def _model_signing_verifies(folder: Path, public: Path) -> bool:
    from model_signing import verifying

    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public).verify(folder, folder / "model.sig")
    except ValueError:
        return False
    return True


def test_a_signed_folder_verifies_here_and_with_model_signing(signed, keys):
    verified = verify_folder(signed, _trusted(keys, "other", "fleet"))
    assert verified.files == ("labels.txt", "model.onnx")
    assert verified.key.path == str(keys["fleet"][1]) and verified.to_dict()["key"] == verified.key.fingerprint[:16]
    assert _model_signing_verifies(signed, keys["fleet"][1])  # the standard's own verifier agrees
    assert verified.unchanged()


def test_one_version_copied_alone_under_another_name_still_verifies(signed, keys, tmp_path):
    copy = tmp_path / "device" / "colour" / "12"
    shutil.copytree(signed, copy)
    assert verify_folder(copy, _trusted(keys, "fleet")).files == ("labels.txt", "model.onnx")


@pytest.mark.parametrize("change, named", [
    ("tamper", "model.onnx differs from the signed file"),
    ("truncate", "model.onnx differs from the signed file"),
    ("extra", "notes.txt is not covered by the signature"),
    ("missing", "labels.txt is signed but missing"),
])
def test_a_changed_folder_is_refused_naming_the_file(signed, keys, change, named):
    model = signed / "model.onnx"
    if change == "tamper":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
    elif change == "truncate":
        model.write_bytes(model.read_bytes()[:-100])
    elif change == "extra":
        (signed / "notes.txt").write_text("added after signing")
    else:
        (signed / "labels.txt").unlink()
    with pytest.raises(SignatureError, match=named) as e:
        verify_folder(signed, _trusted(keys, "fleet"))
    assert "\n" not in str(e.value)
    assert not _model_signing_verifies(signed, keys["fleet"][1])  # and the standard's verifier agrees


def test_another_key_is_named(signed, keys):
    fleet = _trusted(keys, "fleet")[0]
    with pytest.raises(SignatureError, match=f"signed by key {fleet.short}, which is not trusted here") as e:
        verify_folder(signed, _trusted(keys, "other"))
    assert _trusted(keys, "other")[0].short in str(e.value)  # and which keys are trusted


def test_unsigned_and_altered_signatures_are_refused(signed, keys):
    sig = signed / "model.sig"
    doc = json.loads(sig.read_text())
    payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"] = [r for r in payload["predicate"]["resources"] if r["name"] != "labels.txt"]
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    sig.write_text(json.dumps(doc))  # a manifest edited to drop a file: the signature no longer covers it
    with pytest.raises(SignatureError, match="the signature does not verify with key"):
        verify_folder(signed, _trusted(keys, "fleet"))
    sig.write_bytes(b"{" * 100_000)
    with pytest.raises(SignatureError, match="unreadable JSON"):
        verify_folder(signed, _trusted(keys, "fleet"))
    sig.write_bytes(b" " * (MAX_SIGNATURE_BYTES + 1))
    with pytest.raises(SignatureError, match="more than the"):
        verify_folder(signed, _trusted(keys, "fleet"))
    sig.unlink()
    with pytest.raises(SignatureError, match=r"unsigned \(no model.sig\)"):
        verify_folder(signed, _trusted(keys, "fleet"))


def test_links_are_never_followed(signed, keys, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(signed / "model.onnx", outside)
    (signed / "labels.txt").unlink()
    (signed / "labels.txt").symlink_to(outside)
    with pytest.raises(SignatureError, match="labels.txt is a link"):
        verify_folder(signed, _trusted(keys, "fleet"))
    (signed / "labels.txt").unlink()
    real = tmp_path / "real.sig"
    os.replace(signed / "model.sig", real)
    (signed / "model.sig").symlink_to(real)
    with pytest.raises(SignatureError, match="model.sig is a link"):
        verify_folder(signed, _trusted(keys, "fleet"))


def test_p384_keys_sign_and_verify(tmp_path, keys):
    folder = tmp_path / "m"
    checked_model(folder / "model.onnx")
    sign(folder, keys["p384"][0])
    assert verify_folder(folder, _trusted(keys, "p384")).key.path == str(keys["p384"][1])


def test_a_private_key_others_can_read_is_refused_and_never_shown(tmp_path, keys):
    folder = tmp_path / "m"
    checked_model(folder / "model.onnx")
    loose = tmp_path / "loose.key"
    shutil.copy(keys["fleet"][0], loose)
    os.chmod(loose, 0o644)
    with pytest.raises(ExportError, match=r"readable or writable by others \(mode 0644\)") as e:
        sign(folder, loose)
    assert "PRIVATE KEY" not in str(e.value) and not (folder / "model.sig").exists()
    with pytest.raises(TledgeError, match="not a PEM public key"):
        load_trusted_keys([keys["fleet"][0]])  # a private key where a public one belongs: refused, not echoed


def test_classifier_refuses_before_loading(signed, keys, tmp_path):
    with Classifier(signed / "model.onnx", device="cpu", trusted_keys=[keys["fleet"][1]]) as clf:
        assert clf.signature is not None and clf.signature.key.path == str(keys["fleet"][1])
    with pytest.raises(SignatureError, match="which is not trusted here"):
        Classifier(signed / "model.onnx", device="cpu", trusted_keys=[keys["other"][1]])
    unsigned = checked_model(tmp_path / "plain" / "model.onnx")
    with pytest.raises(SignatureError, match="unsigned"):
        Classifier(unsigned, device="cpu", trusted_keys=[keys["fleet"][1]])
    (signed / "model.onnx").write_bytes((signed / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(SignatureError, match="model.onnx differs"):
        Classifier(signed / "model.onnx", device="cpu", trusted_keys=[keys["fleet"][1]])


def test_verify_command(signed, keys, capsys):
    assert main(["verify", str(signed), "--public-key", str(keys["fleet"][1])]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["verify", str(signed / "model.onnx"), "--public-key", str(keys["fleet"][1]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and out["files"] == ["labels.txt", "model.onnx"] and out["ms"] >= 0
    assert main(["verify", str(signed), "--public-key", str(keys["other"][1]), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["verified"] is False
    assert captured.err.count("\n") == 1 and "which is not trusted here" in captured.err
    assert main(["verify", str(signed), "--public-key", str(signed / "model.onnx")]) == 2  # not a key: usage error
