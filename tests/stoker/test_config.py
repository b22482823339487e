"""Every validation rule of the run config, and the message that names the key and file."""

import json

import pytest
import yaml

from stoker.config import RunConfig, json_schema, load_config, parse_config
from stoker.errors import UserError
from tests.conftest import REPO

VALID = {
    "name": "r1",
    "data": {"source": "x.csv", "label": "y", "output": "out"},
}


def error_for(config: dict) -> str:
    with pytest.raises(UserError) as info:
        parse_config(config, "run.yaml")
    return str(info.value)


def with_(path: str, value) -> dict:
    config = json.loads(json.dumps(VALID))
    node = config
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return config


def test_minimal_config_gets_documented_defaults():
    run = parse_config(VALID, "run.yaml")
    assert run.data.split.train == 0.7 and run.data.split.validation == 0.15 and run.data.split.test == 0.15
    assert run.train.deepspeed.zero_stage == 2
    assert run.scaling.num_workers == 2 and run.scaling.data_cpus == 1


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("train.deepspeed.zero_stage", 5, "train.deepspeed.zero_stage: must be 0..3, got 5 (run.yaml)"),
        ("train.deepspeed.zero_stage", -1, "train.deepspeed.zero_stage: must be 0..3, got -1 (run.yaml)"),
        ("train.deepspeed.surprise", 1, "train.deepspeed.surprise: unknown key (run.yaml)"),
        ("colour", "blue", "colour: unknown key (run.yaml)"),
        ("data.split", {"train": 0.8, "validation": 0.15, "test": 0.15},
         "data.split: train + validation + test must sum to 1, got 1.1 (run.yaml)"),
        ("train.deepspeed.fp16", True, "train.deepspeed.fp16: fp16 needs GPUs (scaling.use_gpu is false)"),
        ("train.deepspeed", {"bf16": True, "fp16": True}, "train.deepspeed: bf16 and fp16 are both true"),
        ("train.deepspeed", {"zero_stage": 0, "offload_optimizer": True},
         "train.deepspeed: offload_optimizer needs zero_stage 1, 2 or 3, got 0"),
        ("train.optimizer.name", "adagrad", "train.optimizer.name: input should be 'adamw', 'adam', 'sgd' or 'rmsprop'"),
        ("train.optimizer.lr", 0, "train.optimizer.lr: input should be greater than 0, got 0"),
        ("train.epochs", 0, "train.epochs: input should be greater than or equal to 1, got 0"),
        ("train.batch_size", "big", "train.batch_size: input should be a valid integer"),
        ("model.name", "resnet9000", "model.name: input should be 'mlp'"),
        ("model.hidden", [64, 0], "model: hidden: layer widths must be positive integers, got [64, 0]"),
        ("model.dropout", 1.5, "model.dropout: input should be less than 1"),
        ("scaling.num_workers", 0, "scaling.num_workers: input should be greater than or equal to 1"),
        ("scaling.cpus_per_worker", -1, "scaling.cpus_per_worker: input should be greater than 0"),
        ("data.task", "clustering", "data.task: input should be 'classification', 'regression' or 'language_modeling'"),
        ("data.missing", "guess", "data.missing: input should be"),
        ("data.rows_per_shard", 0, "data.rows_per_shard: input should be greater than 0"),
        ("name", "has spaces", "name: string should match pattern"),
    ],
)
def test_bad_values_name_the_key_and_file(path, value, expected):
    message = error_for(with_(path, value))
    assert message.startswith(expected), message
    assert "(run.yaml)" in message
    assert "\n" not in message


def test_missing_required_key():
    config = json.loads(json.dumps(VALID))
    del config["data"]["source"]
    assert error_for(config) == "data.source: required key is missing (run.yaml)"


def test_fp16_is_allowed_with_gpus():
    config = with_("train.deepspeed.fp16", True)
    config["scaling"] = {"use_gpu": True}
    assert parse_config(config, "run.yaml").train.deepspeed.fp16


def test_config_must_be_a_mapping():
    with pytest.raises(UserError, match="run.yaml: the run config must be a mapping"):
        parse_config(["a", "b"], "run.yaml")


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\ndata: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: line 3, column 1: invalid YAML"):
        load_config(bad)


def test_yaml_is_loaded_safely(tmp_path):
    # A python tag would run code under yaml.load; safe_load refuses it.
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(evil)


def test_schema_documents_every_field():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    missing = []
    for model_name, model in schema["$defs"].items():
        for field, spec in model.get("properties", {}).items():
            if not spec.get("description"):
                missing.append(f"{model_name}.{field}")
    assert not missing, f"fields without a docstring: {missing}"


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_validate(path):
    run = load_config(path)
    assert isinstance(run, RunConfig)
    assert yaml.safe_load(path.read_text())["name"] == run.name


def test_the_cli_config_is_the_run_contract_plus_its_own_sections():
    from stoker.trainer.run_spec import RunSpec, parse_run
    from stoker.tune.schema import SearchRun

    # The layers below the CLI take a RunSpec; RunConfig adds only tune (SearchRun's) and cluster.
    assert issubclass(RunConfig, SearchRun) and issubclass(SearchRun, RunSpec)
    assert set(RunConfig.model_fields) - set(RunSpec.model_fields) == {"tune", "cluster"}
    assert list(RunSpec.model_fields) == ["name", "storage", "data", "model", "train", "scaling"]
    with pytest.raises(UserError, match=r"^cluster: unknown key \(run\.yaml\)$"):
        parse_run({**VALID, "cluster": {}}, "run.yaml")
    # The cross-section check is the contract's: a bare RunSpec refuses fp16 on CPU too.
    with pytest.raises(UserError, match=r"^train\.deepspeed\.fp16: fp16 needs GPUs"):
        parse_run(with_("train.deepspeed.fp16", True), "run.yaml")


def test_a_run_directory_config_record_is_validated_once_naming_the_record(tmp_path):
    from stoker.config import recorded_run
    from stoker.trainer.run_spec import run_from_record

    assert recorded_run(tmp_path) is None  # no record: the caller's defaults apply
    record = {**VALID, "tune": None, "cluster": {"monitor": {"psi": 0.3}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(record))
    assert recorded_run(tmp_path).cluster.monitor.psi == 0.3
    # The run's own sections: the CLI's are left to the CLI.
    assert run_from_record(record, "config.yaml").model_dump() == parse_config(record, "x").model_dump(
        include={"name", "storage", "data", "model", "train", "scaling"})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**VALID, "train": {"epochs": 0}}))
    with pytest.raises(UserError, match=rf"^train\.epochs: .* \({tmp_path}/config\.yaml\)$"):
        recorded_run(tmp_path)
