"""What a Ray Serve deployment of the server is made of: what each replica serves
(``ReplicaConfig``, the single-machine server's options) and how many replicas run where
(``ScalingConfig``). Both are built from one flat dict of arguments, the CLI's flags with
underscores, so ``python -m gpt2onnx.serve.ray`` and a Serve config file's ``args:`` mean
the same thing. Imports no Ray."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.folder import parse_spinning
from gpt2onnx.serve.app import DEFAULT_MAX_BODY_BYTES
from gpt2onnx.serve.engine import EngineConfig

API_KEY_ENV = "GPT2ONNX_API_KEY"  # the single-machine server's variable
PROVIDERS = ("cpu", "cuda")
# Serve refuses (503) what waits beyond this in one proxy's queue; the single-machine
# server's --max-queue default, so neither accepts an unbounded backlog by default.
DEFAULT_MAX_QUEUED_REQUESTS = EngineConfig().max_queue


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica loads and how it answers: one engine over ``model_dir``.

    Args:
        model_dir: the model folder: an absolute path, the same on every node, or a path
            relative to each replica's working directory.
        model_name: the id clients pass as ``model`` and /v1/models lists.
        provider: "cpu" or "cuda" (the replica then reserves a GPU).
        threads: onnxruntime intra-op threads; None: onnxruntime's choice.
        spinning: intra-op spinning (``--no-spin`` gives False; "run": within runs
            only); None: GPT2ONNX_SPIN in the replica's environment, else on (see
            ``serve.engine.server_spinning``).
        engine: batch, queue and timeout limits of each replica's engine.
        api_key: when set, /v1/* requires ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies get 413.
        drain_timeout: seconds in-flight requests get when a replica stops.
    """

    model_dir: str
    model_name: str
    provider: str = "cpu"
    threads: int | None = None
    spinning: bool | str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = 30.0


@dataclass(frozen=True)
class ScalingConfig:
    """How many replicas, what each reserves, and where Serve pushes back.

    Args:
        num_replicas: a fixed replica count; None when autoscaling.
        min_replicas, max_replicas, target_ongoing_requests: Serve's autoscaling bounds
            and target (in-flight requests per replica); all None for a fixed count.
        max_ongoing_requests: requests Serve sends one replica at a time; the rest wait
            in Serve's queue.
        max_queued_requests: requests that may wait in one proxy's queue; more get 503
            from Serve. -1: no bound.
        num_cpus, num_gpus: Ray resources each replica reserves.
    """

    num_replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    max_ongoing_requests: int = EngineConfig().max_batch_size
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def autoscaling(self) -> bool:
        return self.num_replicas is None

    def deployment_options(self, replica: ReplicaConfig) -> dict[str, Any]:
        """Keyword arguments of Serve's ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            # Serve waits this long for in-flight requests before stopping a replica,
            # as uvicorn does on SIGTERM for the single-machine server.
            "graceful_shutdown_timeout_s": replica.drain_timeout,
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.num_replicas
        return options


# Each key of the argument dict: its default (None: the dataclass's own default).
ARGUMENTS: dict[str, Any] = {
    # the single-machine server's options
    "model_dir": None, "served_model_name": None, "provider": "cpu", "threads": None,
    "spinning": None,
    "max_batch_size": EngineConfig().max_batch_size, "max_queue": EngineConfig().max_queue,
    "timeout": EngineConfig().request_timeout, "max_n": EngineConfig().max_choices,
    "api_key": None, "max_body_bytes": DEFAULT_MAX_BODY_BYTES, "shutdown_timeout": 30.0,
    # Ray's
    "replicas": None, "min_replicas": None, "max_replicas": None,
    "target_ongoing_requests": None, "max_ongoing_requests": None,
    "max_queued_requests": DEFAULT_MAX_QUEUED_REQUESTS,
    "num_cpus_per_replica": 1.0, "num_gpus_per_replica": 0.0,
}
TEXT_ARGUMENTS = ("model_dir", "served_model_name", "provider", "api_key")


def configs_from_args(args: Mapping[str, Any]) -> tuple[ReplicaConfig, ScalingConfig]:
    """The replica and scaling configs for ``args`` (keys: ``ARGUMENTS``; only
    ``model_dir`` is required). Every value is checked here, before Ray sees it.

    Raises:
        InvalidParameterError: an unknown key, or a value out of its range; the message
            names the value and what is allowed.
    """
    unknown = sorted(set(args) - set(ARGUMENTS))
    if unknown:
        raise InvalidParameterError(unknown[0], f"unknown argument(s) {', '.join(unknown)}; "
                                    f"known: {', '.join(ARGUMENTS)}.")
    a = {**ARGUMENTS, **{k: _from_text(k, v) for k, v in args.items() if v is not None}}
    if a["model_dir"] is None:
        raise InvalidParameterError("model_dir", "model_dir is required: the path of the "
                                    "model folder, the same on every node.")
    # A relative path stays relative: each replica resolves it against its own working
    # directory, which is the unpacked copy when the app's runtime_env has a working_dir.
    model_dir = Path(os.fspath(a["model_dir"])).expanduser()
    num_cpus = _number(a, "num_cpus_per_replica", low=0.0)
    num_gpus = _number(a, "num_gpus_per_replica", low=0.0)
    provider = a["provider"]
    if provider not in PROVIDERS:
        raise InvalidParameterError("provider", f"provider must be one of {PROVIDERS}, "
                                    f"got {provider!r}.")
    # Ray hides the GPUs from an actor that reserves none, and a GPU reserved for a CPU
    # session sits idle: refuse both rather than fail (or waste) on every replica.
    if provider == "cuda" and num_gpus == 0:
        raise InvalidParameterError("num_gpus_per_replica", "provider 'cuda' needs "
                                    "num_gpus_per_replica > 0: Ray hides the GPUs from "
                                    "replicas that reserve none.")
    if provider == "cpu" and num_gpus > 0:
        raise InvalidParameterError("provider", f"num_gpus_per_replica={num_gpus} reserves "
                                    "GPUs a CPU session never uses; pass provider 'cuda'.")
    if a["threads"] is not None:
        threads: int | None = _integer(a, "threads", low=1)
    else:
        # onnxruntime would start one thread per core of the node in every replica on it;
        # each replica uses the cores it reserved instead.
        threads = math.floor(num_cpus) if num_cpus >= 1 else None
    engine = EngineConfig(max_batch_size=a["max_batch_size"], max_queue=a["max_queue"],
                          request_timeout=a["timeout"], max_choices=a["max_n"])
    replica = ReplicaConfig(
        model_dir=str(model_dir),
        model_name=a["served_model_name"] or model_dir.resolve().name,
        provider=provider, threads=threads, spinning=_spinning(a["spinning"]), engine=engine,
        api_key=a["api_key"] if a["api_key"] is not None else os.environ.get(API_KEY_ENV),
        max_body_bytes=_integer(a, "max_body_bytes", low=1),
        drain_timeout=_number(a, "shutdown_timeout", low=0.0))
    return replica, _scaling(a, engine, num_cpus, num_gpus)


def _scaling(a: dict[str, Any], engine: EngineConfig, num_cpus: float,
             num_gpus: float) -> ScalingConfig:
    bounds = ("min_replicas", "max_replicas", "target_ongoing_requests")
    given = [name for name in bounds if a[name] is not None]
    if a["replicas"] is not None and given:
        raise InvalidParameterError("replicas", "replicas is a fixed count; it excludes "
                                    f"autoscaling ({', '.join(given)}): pass one or the other.")
    # A replica is sent as many requests as its batch has slots: more would only wait in
    # its engine's queue, where Serve can no longer route them to a replica with room.
    max_ongoing = (engine.max_batch_size if a["max_ongoing_requests"] is None
                   else _integer(a, "max_ongoing_requests", low=1))
    common: dict[str, Any] = dict(max_ongoing_requests=max_ongoing,
                                  max_queued_requests=_queued(a["max_queued_requests"]),
                                  num_cpus=num_cpus, num_gpus=num_gpus)
    if not given:
        replicas = 1 if a["replicas"] is None else _integer(a, "replicas", low=1)
        return ScalingConfig(num_replicas=replicas, **common)
    if a["max_replicas"] is None:
        raise InvalidParameterError("max_replicas", "autoscaling needs max_replicas (the "
                                    "most replicas Serve may start).")
    low = 1 if a["min_replicas"] is None else _integer(a, "min_replicas", low=0)
    high = _integer(a, "max_replicas", low=max(low, 1))
    # Default: scale out once requests queue in Serve, i.e. every replica's batch is full.
    target = (float(max_ongoing) if a["target_ongoing_requests"] is None
              else _number(a, "target_ongoing_requests", low=0.0, open_low=True))
    return ScalingConfig(num_replicas=None, min_replicas=low, max_replicas=high,
                         target_ongoing_requests=target, **common)


def _from_text(name: str, value: Any) -> Any:
    """``serve run IMPORT_PATH key=value`` passes every value as text: read numbers."""
    if name in TEXT_ARGUMENTS or not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value  # left for the range check to refuse by name


def _spinning(value: Any) -> bool | str | None:
    """None, True, False or "run"; text (a config file's value) as GPT2ONNX_SPIN reads."""
    if value is None or isinstance(value, bool):
        return value
    if value in (0, 1) and not isinstance(value, float):
        return bool(value)  # ``spinning=0`` in a config file reads as the number
    return parse_spinning(str(value), f"spinning={value!r}", "spinning",
                          "pass false to turn intra-op spinning off, or leave it out")


def _integer(a: Mapping[str, Any], name: str, low: int) -> int:
    value = a[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(name, f"{name} must be an integer >= {low}, got {value!r}.")
    return value


def _number(a: Mapping[str, Any], name: str, low: float, open_low: bool = False) -> float:
    value = a[name]
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value) and (value > low if open_low else value >= low))
    if not ok:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise InvalidParameterError(name, f"{name} must be a number {bound}, got {value!r}.")
    return float(value)


def _queued(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
        raise InvalidParameterError("max_queued_requests", "max_queued_requests must be an "
                                    f"integer >= 1, or -1 for no bound, got {value!r}.")
    return value
