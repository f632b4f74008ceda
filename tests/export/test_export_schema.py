"""The metadata contract, published as a JSON Schema for other readers: every file tledge exports validates
against it, and the schema names exactly the fields the Python dataclasses have."""

from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources

import jsonschema
import onnx
import pytest

from tledge_runtime.model.answers import OOD, Answers, Conformal, OperatingPoint
from tledge_runtime.model.engine_target import EngineTarget
from tledge_runtime.model.meta import ONNX_KEY, InputSpec, ModelMeta, OutputSpec, Preprocess, Provenance, Quantization
from tledge_runtime.model.reference_set import Fingerprint, ReferenceItem, ReferenceSet
from tledge_runtime.model.verification import Budget, ClassDelta, Flips, Verification

SCHEMA = json.loads(resources.files("tledge_runtime").joinpath("schema/model-metadata.schema.json").read_text())


def _document(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[ONNX_KEY])


def test_the_schema_is_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("fixture", ["exported", "exported_cli"])
def test_every_exported_file_validates(request, fixture):
    out = request.getfixturevalue(fixture).out
    files = sorted(out.glob("*.onnx"))
    assert len(files) == 3
    for path in files:
        jsonschema.validate(_document(path), SCHEMA)


def test_a_document_outside_the_contract_does_not_validate(exported):
    doc = _document(exported.out / "model.onnx")
    for broken in ({**doc, "precision": "fp8"}, {**doc, "extra": 1},
                   {**doc, "preprocess": {**doc["preprocess"], "height": 100000}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)


@pytest.mark.parametrize("cls, where", [
    (ModelMeta, SCHEMA), (Preprocess, SCHEMA["$defs"]["preprocess"]), (Provenance, SCHEMA["$defs"]["provenance"]),
    (InputSpec, SCHEMA["$defs"]["input"]), (OutputSpec, SCHEMA["$defs"]["output"]),
    (Quantization, SCHEMA["$defs"]["quantization"]), (Budget, SCHEMA["$defs"]["budget"]),
    (EngineTarget, SCHEMA["$defs"]["engine"]), (ReferenceSet, SCHEMA["$defs"]["reference_set"]),
    (Verification, SCHEMA["$defs"]["verification"]), (Answers, SCHEMA["$defs"]["answers"]),
    (OperatingPoint, SCHEMA["$defs"]["operating_point"]), (Conformal, SCHEMA["$defs"]["conformal"]),
    (OOD, SCHEMA["$defs"]["ood"]),
    (Flips, SCHEMA["$defs"]["verification"]["properties"]["flips"]),
    (ClassDelta, SCHEMA["$defs"]["verification"]["properties"]["per_class"]["items"]),
    (ReferenceItem, SCHEMA["$defs"]["reference_set"]["properties"]["items"]["items"]),
    (Fingerprint, SCHEMA["$defs"]["reference_set"]["properties"]["items"]["items"]["properties"]["fingerprint"]),
], ids=lambda x: getattr(x, "__name__", ""))
def test_schema_and_dataclasses_name_the_same_fields(cls, where):
    derived = {"accuracy_delta_points", "delta_points"}  # written for people reading the JSON, not read back
    assert {f.name for f in fields(cls)} == set(where["properties"]) - derived
