"""Dataset scanning, splitting and bad-file handling (tledge.data.folders, tledge.data.imagecache)."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tledge.data.folders import Splits, list_images, load_splits, stratified_split
from tledge.data.imagecache import decode_images, require_every_class, summarize_skipped
from tledge.errors import DataError
from tledge_runtime.model.meta import Preprocess

from ...datasets import COLOURS, make_dataset, write_images


def test_folder_layout_is_split_stratified_and_seeded(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=20)
    a = load_splits(data, val_split=0.1, test_split=0.2, seed=3)
    b = load_splits(data, val_split=0.1, test_split=0.2, seed=3)
    c = load_splits(data, val_split=0.1, test_split=0.2, seed=4)
    assert a.classes == ["blue", "green", "red"] and a.origin == "made"
    assert a.counts() == {"train": 42, "val": 6, "test": 12}
    for split in (a.train, a.val, a.test):
        assert Counter(s.label for s in split).keys() == {0, 1, 2}
    assert [s.path for s in a.test] == [s.path for s in b.test]
    assert [s.path for s in a.test] != [s.path for s in c.test]
    every = [s.path for s in a.train + a.val + a.test]
    assert len(every) == len(set(every)) == 60


def test_split_layout_used_as_given_and_val_carved_when_missing(tmp_path):
    data = make_dataset(tmp_path / "d", layout="split")
    s = load_splits(data)
    assert s.origin == "given" and s.counts() == {"train": 42, "val": 12, "test": 12}
    import shutil

    shutil.rmtree(data / "val")
    s = load_splits(data, val_split=0.2)
    assert s.counts()["val"] == 9 and s.counts()["test"] == 12  # 3 of each class's 14 train images


def test_split_json_round_trip(tmp_path):
    s = load_splits(make_dataset(tmp_path / "d"))
    assert Splits.from_json(s.to_json()) == s


def test_small_classes_keep_a_training_image():
    from tledge.data.folders import Sample

    samples = [Sample(Path(f"/x/{c}{i}.png"), c) for c in (0, 1) for i in range(3 if c else 2)]
    train, val, test = stratified_split(samples, (0.3, 0.3), seed=0)
    assert {s.label for s in train} == {0, 1}
    assert len(train) + len(val) + len(test) == 5


@pytest.mark.parametrize("make, message", [
    (lambda r: None, "no such folder"),
    (lambda r: r.mkdir(), "no class folders"),
    (lambda r: write_images(r / "only", COLOURS["red"], 3, seed=0), "only one class"),
    (lambda r: (write_images(r / "a", COLOURS["red"], 3, seed=0), (r / "b").mkdir()), "hold no image files"),
])
def test_unusable_folders_are_clear_errors(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=message) as e:
        load_splits(root)
    assert e.value.hint


def test_class_sets_that_differ_between_splits_are_an_error(tmp_path):
    data = make_dataset(tmp_path / "d", layout="split")
    write_images(data / "val" / "purple", (128, 0, 128), 2, seed=9)
    with pytest.raises(DataError, match=r"val: class folders differ from train/ \(missing: -, extra: \['purple'\]\)"):
        load_splits(data)


def test_listing_skips_hidden_files_survives_symlink_loops_and_reads_upper_case(tmp_path):
    root = tmp_path / "c"
    write_images(root, COLOURS["red"], 2, seed=0)
    Image.new("RGB", (8, 8)).save(root / "UPPER.JPG")
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    (root / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "sub" / "nested.png")
    os.symlink(root, root / "sub" / "loop")  # a directory symlink back up: must not recurse forever
    os.symlink(root / "missing.png", root / "dangling.png")
    names = [p.name for p in list_images(root)]
    assert names == ["UPPER.JPG", "img000.png", "img001.png", "nested.png"]


def _bad_files(folder: Path) -> dict[str, str]:
    """One file per failure mode, with the kind tledge must report for it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.new("L", (64, 64)).save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[:60])
    # A decompression bomb: a tiny PNG that claims 40000 x 40000 pixels.
    Image.new("1", (40_000, 40_000)).save(folder / "bomb.png", optimize=True)
    return {"zero.png": "empty", "text.jpg": "not_image", "truncated.jpg": "corrupt", "truncated.png": "corrupt",
            "bomb.png": "too_large"}


def test_bad_files_are_skipped_and_counted_by_reason(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=6)
    expected = _bad_files(data / "red")
    splits = load_splits(data, val_split=0.0, test_split=0.0)
    geometry = Preprocess(height=32, width=32)
    decoded = decode_images(splits.train, geometry, workers=2)
    assert len(decoded) == 18 and decoded.images.shape == (18, 32, 32, 3)
    kinds = {p.name: kind for p, kind, _ in decoded.skipped}
    assert kinds == expected
    line = summarize_skipped(decoded.skipped, len(splits.train))
    assert line == "skipped 5 of 23 images: 2 corrupt, 1 empty, 1 not image, 1 too large"
    require_every_class(decoded, splits.classes, "train")


def test_a_class_of_only_bad_files_is_an_error(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=6, classes=("red", "green"))
    bad = tmp_path / "d" / "blue"
    _bad_files(bad)
    splits = load_splits(data, val_split=0.0, test_split=0.0)
    decoded = decode_images(splits.train, Preprocess(height=32, width=32), workers=2)
    with pytest.raises(DataError, match="class\\(es\\) blue have no readable images"):
        require_every_class(decoded, splits.classes, "train")
