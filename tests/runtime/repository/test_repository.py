"""ModelRepository: the highest good version serves; new ones are verified, checked, warmed and swapped in while
leases taken before finish on their version; every bad version is refused for its own reason."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest
from fleet_testkit import checked_model, expected_probabilities, make_key, version_folder
from runtime_testkit import colour_image

from tledge_runtime.errors import BackendError, TledgeError
from tledge_runtime.repository import ModelRepository


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {"fleet": make_key(d, "fleet"), "other": make_key(d, "other")}


def _repo(root, **kw) -> ModelRepository:
    return ModelRepository(root, device="cpu", settle_s=kw.pop("settle_s", 0.0), **kw)


def _reason(repo, version) -> str:
    return next(s.reason for s in repo.index() if s.version == version)


def test_the_highest_good_version_serves_and_a_new_one_is_swapped_in(tmp_path):
    for v in (1, 2, 3):
        version_folder(tmp_path, v)
    repo = _repo(tmp_path)
    assert repo.name == "colour" and repo.current.version == 3
    assert [(s.version, s.state) for s in repo.index()] == [(3, "READY"), (2, "UNAVAILABLE"), (1, "UNAVAILABLE")]
    assert set(repo.current.seconds) == {"verify", "load", "check", "warmup"}
    image = colour_image("red", seed=1)
    with repo.lease() as old:
        version_folder(tmp_path, 4)
        events = repo.refresh()
        assert [(e.version, e.kind) for e in events] == [(4, "swap")] and repo.current.version == 4
        # the lease taken before the swap still answers with version 3's numbers
        np.testing.assert_allclose(old.classifier.scores(image), expected_probabilities(3, old.classifier.prepare(image)),
                                   atol=1e-5)
    with pytest.raises(BackendError, match="closed"):
        old.classifier.scores(image)  # closed once its last lease ended: memory does not grow with swaps
    with repo.lease() as new:
        np.testing.assert_allclose(new.classifier.scores(image), expected_probabilities(4, new.classifier.prepare(image)),
                                   atol=1e-5)
    repo.close()


def test_each_bad_version_is_refused_for_its_reason(tmp_path, keys):
    private, public = keys["fleet"]
    version_folder(tmp_path, 1, key=private)
    repo = _repo(tmp_path, trusted_keys=[public])
    assert repo.current.version == 1 and repo.current.signature_status["verified"] is True

    version_folder(tmp_path, 2)  # unsigned: waits for its model.sig (the completion marker of signed versions)
    assert repo.refresh() == [] and "no model.sig yet" in _reason(repo, 2)
    tampered = version_folder(tmp_path, 3, key=private)
    with open(tampered / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    version_folder(tmp_path, 4, key=keys["other"][0])
    failing = version_folder(tmp_path, 5, key=private, scale=1.5)  # signed, but its numerics differ from its reference
    events = {e.version: e for e in repo.refresh()}
    assert {v: e.kind for v, e in events.items()} == {5: "check", 4: "signature", 3: "signature"}
    assert "model.onnx differs from the signed file" in events[3].reason
    assert "which is not trusted here" in events[4].reason
    assert "reference" in events[5].reason or "logit" in events[5].reason
    assert repo.current.version == 1 and failing.exists()

    version_folder(tmp_path, 6, key=private)
    assert [(e.version, e.kind) for e in repo.refresh()] == [(6, "swap")]
    shutil.rmtree(tmp_path / "colour" / "2")
    version_folder(tmp_path, 2, key=private)  # older than the serving one: refused without loading it
    assert [(e.version, e.kind) for e in repo.refresh()] == [(2, "rollback")]
    assert "older than version 6" in _reason(repo, 2) and repo.current.version == 6
    assert repo.refresh() == []  # a refusal is not repeated while the folder stays the same
    repo.close()


def test_a_half_copied_version_is_left_alone_until_complete(tmp_path):
    version_folder(tmp_path, 1)
    time.sleep(0.7)  # version 1 settles before the repository opens
    repo = _repo(tmp_path, settle_s=0.6)
    assert repo.current.version == 1
    source = checked_model(tmp_path / "staging" / "model.onnx", 2).read_bytes()
    target = tmp_path / "colour" / "2" / "model.onnx"
    target.parent.mkdir()
    with open(target, "wb") as f:  # an agent copying in place: half the file now, the rest later
        f.write(source[: len(source) // 2])
        f.flush()
        assert repo.refresh() == [] and _reason(repo, 2).startswith("incomplete: files changed")
        time.sleep(0.3)
        f.write(source[len(source) // 2:])
    assert repo.refresh() == [] and repo.current.version == 1  # still growing a moment ago
    time.sleep(0.7)
    assert [(e.version, e.kind) for e in repo.refresh()] == [(2, "swap")]
    repo.close()


def test_rollback_by_removing_the_serving_version_needs_allow_rollback(tmp_path):
    for v in (1, 2):
        version_folder(tmp_path, v)
    strict, relaxed = _repo(tmp_path), _repo(tmp_path, allow_rollback=True)
    shutil.rmtree(tmp_path / "colour" / "2")
    assert strict.refresh() == [] and strict.current.version == 2  # keeps the loaded copy
    assert "folder was removed" in _reason(strict, 2)
    assert [(e.version, e.kind) for e in relaxed.refresh()] == [(1, "swap")]
    strict.close()
    relaxed.close()


def test_a_changed_serving_version_and_hostile_folders_are_refused(tmp_path):
    version_folder(tmp_path, 1)
    repo = _repo(tmp_path)
    (tmp_path / "colour" / "1" / "notes.txt").write_text("edited in place")
    assert [(e.version, e.kind) for e in repo.refresh()] == [(1, "changed")] and repo.current.version == 1
    outside = version_folder(tmp_path / "elsewhere", 9)
    os.symlink(outside, tmp_path / "colour" / "9")
    plan = tmp_path / "colour" / "8"
    plan.mkdir()
    (plan / "model.plan").write_bytes(b"raw plan")
    two = tmp_path / "colour" / "7"
    two.mkdir()
    checked_model(two / "model.onnx")
    (two / "b.engine").write_bytes(b"x")
    events = {e.version: e for e in repo.refresh()}
    assert {v: e.kind for v, e in events.items()} == {9: "load", 8: "load", 7: "load"}
    assert "links are not followed" in events[9].reason and "model.plan" in events[8].reason
    assert "2 model files" in events[7].reason and repo.current.version == 1
    repo.close()


def test_unload_and_load(tmp_path):
    version_folder(tmp_path, 1)
    repo = _repo(tmp_path)
    repo.unload()
    assert repo.current is None and _reason(repo, 1) == "unloaded"
    with pytest.raises(BackendError, match="no version of colour serves"), repo.lease():
        pass
    assert repo.load().version == 1
    repo.close()
    with pytest.raises(TledgeError, match="cannot list the model repository"):
        _repo(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TledgeError, match="holds no models"):
        _repo(tmp_path / "empty")


def test_concurrent_predictions_through_swaps_match_the_version_they_name(tmp_path):
    version_folder(tmp_path, 1)
    repo = _repo(tmp_path)
    image = colour_image("green", seed=3)
    prepared = repo.current.classifier.prepare(image)
    wrong, done, stop = [], [0], threading.Event()

    def client() -> None:
        while not stop.is_set():
            with repo.lease() as model:
                got = model.classifier.infer(prepared[None])[0]
                if not np.allclose(got, expected_probabilities(model.version, prepared), atol=1e-5):
                    wrong.append(model.version)
                done[0] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for v in range(2, 7):
        version_folder(tmp_path, v)
        assert [e.kind for e in repo.refresh()] == ["swap"]
    stop.set()
    for t in threads:
        t.join()
    assert wrong == [] and done[0] > 20 and repo.current.version == 6
    repo.close()
