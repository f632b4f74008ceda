"""The probe's cache (tledge.train.speed.cache): read back what was written; anything else is ignored and rewritten."""

from __future__ import annotations

import json

import pytest

from tledge.train.speed import cache


def test_entries_round_trip_by_key_and_the_oldest_go_first(tmp_path):
    path = tmp_path / "choices.json"
    assert cache.read_entry("a", path) is None  # no file yet
    cache.write_entry("a", {"fold_error": {"logits": 1e-6, "gradients": 1e-3}}, path)
    cache.write_entry("b", {"x": 1}, path)
    assert cache.read_entry("a", path) == {"fold_error": {"logits": 1e-6, "gradients": 1e-3}}
    assert cache.read_entry("c", path) is None
    for i in range(cache.MAX_ENTRIES + 5):
        cache.write_entry(f"k{i}", {"i": i}, path)
    kept = json.loads(path.read_text())
    assert len(kept) == cache.MAX_ENTRIES and "a" not in kept and f"k{cache.MAX_ENTRIES + 4}" in kept


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"a": 7}', b""])
def test_a_corrupt_cache_is_ignored_and_rewritten_whole(tmp_path, content):
    path = tmp_path / "choices.json"
    path.write_bytes(content)
    assert cache.read_entry("a", path) is None
    cache.write_entry("b", {"x": 1}, path)
    assert json.loads(path.read_text())["b"] == {"x": 1}  # valid JSON again
    assert cache.read_entry("b", path) == {"x": 1}


def test_an_oversized_cache_is_not_read(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"a": {"pad": "x" * cache.MAX_BYTES}}))
    assert cache.read_entry("a", path) is None


def test_an_unwritable_cache_is_only_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache.write_entry("a", {"x": 1}, blocker / "choices.json")  # its folder is a file
    assert "could not write the training probe's cache" in caplog.text


def test_the_cache_lives_under_tledge_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TLEDGE_CACHE", str(tmp_path))
    assert cache.cache_file() == tmp_path / "train" / "choices.json"
