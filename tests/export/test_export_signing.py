"""tledge export --sign-key: the export folder and each Triton version folder signed (OpenSSF model-signing), verified by
the runtime and by model_signing; the Triton repository served as written, or one version copied alone; links refused."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tledge.cli.main import main
from tledge_runtime.repository import ModelRepository, load_trusted_keys, verify_folder
from tledge_runtime.repository.signature import SIGNATURE_NAME

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
from fleet_testkit import make_key

NAME = "efficientnet_lite0_fp32"


def _export(run, out: Path, *extra: str):
    return CliRunner().invoke(main, ["export", str(run.best), "--out", str(out), "--triton", "--workers", "2", *extra])


@pytest.fixture(scope="module")
def signed_export(tiny_run, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    private, public = make_key(keys)
    out = tmp_path_factory.mktemp("signed") / "export"
    result = _export(tiny_run, out, "--sign-key", str(private))
    assert result.exit_code == 0, result.output
    return out, private, public, result.output


def test_the_export_and_each_version_folder_are_signed(signed_export):
    out, private, public, output = signed_export
    keys = load_trusted_keys([public])
    whole = verify_folder(out, keys)
    assert {"model.onnx", "report.json", f"triton/{NAME}/1/model.onnx", f"triton/{NAME}/config.pbtxt",
            f"triton/{NAME}/1/{SIGNATURE_NAME}", f"triton/{NAME}_image/1/model.py"} <= set(whole.files)
    for version in (out / "triton" / NAME / "1", out / "triton" / f"{NAME}_image" / "1"):
        assert verify_folder(version, keys).files == tuple(sorted(p.name for p in version.iterdir()
                                                                  if p.name != SIGNATURE_NAME))
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(out, out / SIGNATURE_NAME)
    assert f"with key {whole.key.short}" in output
    report = (out / "report.json").read_text()
    assert str(private) not in report and json.loads(report)["signed"] is True


def test_the_triton_repository_serves_as_written_and_a_version_copied_alone(signed_export, tmp_path):
    out, _, public, _ = signed_export
    repo = ModelRepository(out / "triton", NAME, trusted_keys=[public], device="cpu", settle_s=0.0)
    assert repo.current.version == 1 and repo.current.signature_status["verified"] is True
    repo.close()
    device = tmp_path / "device"
    shutil.copytree(out / "triton" / NAME / "1", device / NAME / "7")  # one version, renumbered, nothing else
    repo = ModelRepository(device, trusted_keys=[public], device="cpu", settle_s=0.0)
    assert repo.name == NAME and repo.current.version == 7
    repo.close()


def test_an_unsigned_re_export_removes_old_signatures(tiny_run, signed_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(signed_export[0], out)
    assert _export(tiny_run, out).exit_code == 0
    assert not (out / SIGNATURE_NAME).exists() and not (out / "triton" / NAME / "1" / SIGNATURE_NAME).exists()


def test_a_readable_key_is_refused_before_any_work(tiny_run, signed_export, tmp_path):
    loose = tmp_path / "loose.key"
    shutil.copy(signed_export[1], loose)
    os.chmod(loose, 0o640)
    result = _export(tiny_run, tmp_path / "never", "--sign-key", str(loose))
    assert result.exit_code == 2 and "readable or writable by others (mode 0640)" in result.output
    assert not (tmp_path / "never").exists() and "PRIVATE KEY" not in result.output


def test_the_triton_writer_refuses_planted_links(tiny_run, signed_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(signed_export[0], out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    version = out / "triton" / NAME / "1"
    shutil.rmtree(version)
    version.symlink_to(elsewhere, target_is_directory=True)
    result = _export(tiny_run, out)
    assert result.exit_code == 2 and f"{version}: is a link" in result.output
    assert list(elsewhere.iterdir()) == []
