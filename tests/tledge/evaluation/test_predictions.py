"""`tledge evaluate --predictions`: the CSV is valid UTF-8 whatever the file names are, and its path column
leads back to each file (tledge.evaluation.predictions.path_from_csv)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tledge.evaluation.predictions import path_from_csv, path_to_csv

# A Latin-1 name (not valid UTF-8), a name with a backslash that looks like an escape, and plain UTF-8.
NAMES = [b"caf\xe9.png", b"back\\x41slash.png", "ünïcode ✓.png".encode()]


@pytest.mark.parametrize("raw", NAMES + [b"\xff\xfe\\\\.png", b"dir/\xc3(.png"])
def test_escaping_round_trips_every_byte_name(raw):
    path = Path(os.fsdecode(raw))
    text = path_to_csv(path)
    text.encode("utf-8")  # strict: no surrogates left
    assert path_from_csv(text) == path


def test_plain_utf8_names_are_written_as_they_are():
    assert path_to_csv(Path("data/ok/ünï.png")) == "data/ok/ünï.png"


def test_csv_is_utf8_and_finds_files_with_undecodable_names(tiny_run, tmp_path):
    from tledge.cli.main import main

    source = Path(tiny_run.metrics["config"]["data"])
    data = tmp_path / "data"
    for cls in sorted(d for d in source.iterdir() if d.is_dir()):
        (data / cls.name).mkdir(parents=True)
        first = sorted(cls.glob("*.png"))[: len(NAMES)]
        for image, raw in zip(first, NAMES):
            shutil.copy(image, os.path.join(os.fsencode(data / cls.name), raw))
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(main, ["evaluate", str(tiny_run.best), str(data), "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_bytes().decode("utf-8")  # strict: raises on any invalid byte
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == len(NAMES) * len(list(data.iterdir()))
    found = {os.fsencode(path_from_csv(r["path"]).name) for r in rows}
    assert found == set(NAMES)
    assert all(path_from_csv(r["path"]).is_file() for r in rows)
    assert any("caf\\xe9.png" in r["path"] for r in rows)  # the documented escape, visible to a reader
