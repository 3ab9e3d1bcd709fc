import pytest

from longcat_tools import schemas
from longcat_tools.errors import LongcatError
from longcat_tools.synth import dit_config

BSA = {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}


def test_every_schema_is_valid_draft_2020_12_with_an_id():
    from jsonschema import Draft202012Validator

    assert "transformer_config" in schemas.names()
    for name in schemas.names():
        doc = schemas.load(name)
        Draft202012Validator.check_schema(doc)
        assert doc["$schema"].endswith("2020-12/schema")
        assert doc["$id"].endswith(name + ".schema.json")


def test_hub_config_passes_in_both_flavours():
    cfg = dit_config("real")
    assert schemas.errors(cfg, "transformer_config") == []
    fv = {k: v for k, v in cfg.items() if k != "num_heads"}
    fv |= {"_class_name": "LongCatTransformer3DModel", "num_attention_heads": 32}
    assert schemas.errors(fv, "transformer_config") == []
    assert schemas.errors({**cfg, "bsa_params": None}, "transformer_config") == []
    cdf_only = {**BSA, "sparsity": None, "cdf_threshold": 0.98}
    assert schemas.errors({**cfg, "bsa_params": cdf_only}, "transformer_config") == []


@pytest.mark.parametrize("change, where", [
    ({"bsa_params": {**BSA, "sparsity": 1.5}}, "bsa_params/sparsity"),
    ({"bsa_params": {**BSA, "sparsity": 0}}, "bsa_params/sparsity"),
    ({"bsa_params": {**BSA, "cdf_threshold": 0}}, "bsa_params/cdf_threshold"),
    ({"bsa_params": {**BSA, "chunk_3d_shape_q": [0, 4, 4]}}, "bsa_params/chunk_3d_shape_q/0"),
    ({"bsa_params": {**BSA, "chunk_3d_shape_k": [4, 4]}}, "bsa_params/chunk_3d_shape_k"),
    ({"bsa_params": {**BSA, "sparsity": None}}, "bsa_params"),
    ({"bsa_params": {**BSA, "typo": 1}}, "bsa_params"),
    ({"enable_bsa": "yes"}, "enable_bsa"),
    ({"depth": "48"}, "depth"),
    ({"_class_name": "Other"}, "_class_name"),
])
def test_bad_fields_are_located(change, where):
    errs = schemas.errors({**dit_config("real"), **change}, "transformer_config")
    assert errs and errs[0].startswith(where + ":")


def test_validate_raises_one_line_naming_the_file():
    with pytest.raises(LongcatError, match=r"^x/config.json: enable_bsa: .* \[schema"):
        schemas.validate({**dit_config("tiny"), "enable_bsa": "yes"}, "transformer_config",
                         "x/config.json")


@pytest.mark.parametrize("file, valid", [
    ("distilled/cfg_step_lora.safetensors", True), ("../x.safetensors", False),
    ("/abs.safetensors", False), ("a\\b.safetensors", False),
    ("a\n/../../dit/x.safetensors", False)])  # the lookahead stopped at the newline
def test_a_lora_manifest_file_stays_inside_lora(file, valid):
    doc = {"version": 1, "adapters": [{"name": "a", "file": file, "format": "native", "rank": 4,
                                       "alpha": 4.0, "targets": ["blocks.*.ffn.w1"],
                                       "default_scale": 1.0}]}
    found = schemas.errors(doc, "lora_manifest")
    assert (found == []) == valid, found
