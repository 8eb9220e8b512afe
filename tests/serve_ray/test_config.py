"""The Ray CLI's flags and a Serve config file's args become the same replica and scaling
configs, checked before Ray sees them. No cluster, and no Ray but for the config file."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.serve.ray.__main__ import parse_args
from gpt2onnx.serve.ray.config import ARGUMENTS, configs_from_args

CONFIG_FILE = Path(__file__).parents[2] / "deploy" / "ray-serve.yaml"


def test_cli_flags_reach_the_replica_and_the_deployment_options(tmp_path: Path) -> None:
    options, args = parse_args([str(tmp_path), "--replicas", "3", "--max-queue", "5",
                                "--max-queued-requests", "7", "--max-batch-size", "4",
                                "--num-cpus-per-replica", "2", "--port", "9000",
                                "--served-model-name", "m", "--address", "auto"])
    assert (options.port, options.address) == (9000, "auto")
    replica, scaling = configs_from_args(args)
    # --max-queue is the engine's and --max-queued-requests Serve's: no prefix confusion
    assert replica.engine.max_queue == 5 and scaling.max_queued_requests == 7
    assert replica.model_dir == str(tmp_path.resolve()) and replica.model_name == "m"
    assert replica.threads == 2  # onnxruntime gets the cores the replica reserved
    assert scaling.deployment_options(replica) == {
        "num_replicas": 3, "max_ongoing_requests": 4, "max_queued_requests": 7,
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.0},
        "graceful_shutdown_timeout_s": 30.0}


def test_autoscaling_bounds_replace_the_fixed_count() -> None:
    replica, scaling = configs_from_args({"model_dir": "m", "min_replicas": 1,
                                          "max_replicas": 4, "max_batch_size": 8})
    options = scaling.deployment_options(replica)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                             "target_ongoing_requests": 8.0}


def test_text_values_from_serve_run_key_value_args_are_read_as_numbers() -> None:
    _, scaling = configs_from_args({"model_dir": "m", "replicas": "2",
                                    "num_cpus_per_replica": "0.5"})
    assert (scaling.num_replicas, scaling.num_cpus) == (2, 0.5)


def test_a_relative_model_dir_is_resolved_by_each_replica_but_the_cli_resolves_it_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A Serve config's runtime_env working_dir is unpacked on each node: "." is that copy.
    replica, _ = configs_from_args({"model_dir": ".", "served_model_name": "m"})
    assert replica.model_dir == "."
    monkeypatch.chdir(tmp_path)
    _, args = parse_args(["model"])
    assert args["model_dir"] == tmp_path.resolve() / "model"


@pytest.mark.parametrize(("args", "message"), [
    ({"replicas": 2, "max_replicas": 4}, "replicas is a fixed count; it excludes autoscaling"),
    ({"min_replicas": 1}, "autoscaling needs max_replicas"),
    ({"replicas": 0}, "replicas must be an integer >= 1, got 0."),
    ({"provider": "cuda"}, "provider 'cuda' needs num_gpus_per_replica > 0"),
    ({"num_gpus_per_replica": 1}, "pass provider 'cuda'"),
    ({"max_queued_requests": 0}, "max_queued_requests must be an integer >= 1, or -1"),
    ({"num_cpus_per_replica": "many"}, "num_cpus_per_replica must be a number >= 0, "
                                       "got 'many'."),
    ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0."),
    ({"replica": 2}, "unknown argument(s) replica; known: model_dir"),
])
def test_bad_arguments_are_refused_with_the_value_and_the_range(args: dict, message: str
                                                                ) -> None:
    with pytest.raises(InvalidParameterError) as info:
        configs_from_args({"model_dir": "m", **args})
    assert message in str(info.value)


def test_the_serve_config_file_names_the_builder_and_only_known_args() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with ray[serve]: "
                               "pip install 'gpt2onnx[ray]'")
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed; "
                        "`pip install 'gpt2onnx[ray]'` enables this test")
    (app,) = yaml.safe_load(CONFIG_FILE.read_text())["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert callable(builder) and set(app["args"]) <= set(ARGUMENTS)
    replica, scaling = configs_from_args(app["args"])
    assert scaling.num_replicas == 2 and replica.model_name == "pydoc-tiny-onnx"


def test_no_spin_reaches_the_replica(tmp_path: Path) -> None:
    _, args = parse_args([str(tmp_path), "--no-spin"])
    assert configs_from_args(args)[0].spinning is False
    _, args = parse_args([str(tmp_path)])
    assert configs_from_args(args)[0].spinning is None  # the replica's GPT2ONNX_SPIN, else on


@pytest.mark.parametrize(("value", "expected"), [
    ("false", False), ("0", False), ("run", "run"), ("on", True), (True, True)])
def test_spinning_from_a_config_file(value: object, expected: object) -> None:
    replica, _ = configs_from_args({"model_dir": "m", "spinning": value})
    assert replica.spinning == expected and type(replica.spinning) is type(expected)


def test_a_bad_spinning_value_names_itself() -> None:
    with pytest.raises(InvalidParameterError, match=r"spinning='sometimes' is not one of"):
        configs_from_args({"model_dir": "m", "spinning": "sometimes"})
