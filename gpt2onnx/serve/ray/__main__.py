"""python -m gpt2onnx.serve.ray MODEL_DIR [--replicas N | --min-replicas A --max-replicas B
[--target-ongoing-requests T]] [--num-cpus-per-replica C] [--num-gpus-per-replica G]
[--host 127.0.0.1] [--port P] [--address RAY_ADDRESS] [every python -m gpt2onnx.serve option]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from gpt2onnx.cli import Parser, run_main
from gpt2onnx.serve import __main__ as single_machine
from gpt2onnx.serve.ray.config import DEFAULT_MAX_QUEUED_REQUESTS, configs_from_args

# The single-machine CLI's options that configure a replica (names as configs_from_args).
SERVE_OPTIONS = ("model_dir", "served_model_name", "provider", "threads", "spinning",
                 "max_batch_size", "max_queue", "timeout", "max_n", "api_key",
                 "max_body_bytes", "shutdown_timeout")
RAY_OPTIONS = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
               "max_ongoing_requests", "max_queued_requests", "num_cpus_per_replica",
               "num_gpus_per_replica")


def ray_parser() -> argparse.ArgumentParser:
    # No abbreviations: "--max-queue" (the engine's) must not be taken for a prefix of
    # "--max-queued-requests" (Serve's).
    p = Parser(
        prog="python -m gpt2onnx.serve.ray", allow_abbrev=False,
        usage="%(prog)s MODEL_DIR [Ray options] [python -m gpt2onnx.serve options]",
        description="Serve a model folder as Ray Serve replicas behind the same "
                    "OpenAI-compatible API as python -m gpt2onnx.serve.",
        epilog="Every option of `python -m gpt2onnx.serve` (MODEL_DIR, --host, --port, "
               "--provider, --threads, --no-spin, --max-batch-size, --max-queue, --timeout, "
               "--max-n, --api-key, --served-model-name, --max-body-bytes, --shutdown-timeout, "
               "--log-level) is accepted and means the same, per replica; --host/--port "
               "are Serve's HTTP proxy's. See docs/ray.md.")
    scale = p.add_argument_group("replicas (a fixed count, or autoscaling bounds)")
    scale.add_argument("--replicas", type=int, default=None, help="fixed replica count "
                       "(default 1)")
    scale.add_argument("--min-replicas", type=int, default=None,
                       help="autoscaling: fewest replicas (default 1)")
    scale.add_argument("--max-replicas", type=int, default=None,
                       help="autoscaling: most replicas (turns autoscaling on)")
    scale.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="autoscaling: in-flight requests per replica Serve aims for "
                            "(default: --max-ongoing-requests)")
    res = p.add_argument_group("resources and backpressure, per replica")
    res.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                     help="CPUs each replica reserves; also its onnxruntime threads unless "
                          "--threads is given (default 1)")
    res.add_argument("--num-gpus-per-replica", type=float, default=0.0,
                     help="GPUs each replica reserves (needs --provider cuda)")
    res.add_argument("--max-ongoing-requests", type=int, default=None,
                     help="requests Serve sends one replica at a time "
                          "(default: --max-batch-size)")
    res.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                     help="requests that may wait in Serve's queue; more get 503 "
                          f"(-1: no bound; default {DEFAULT_MAX_QUEUED_REQUESTS})")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--address", default=None,
                         help="Ray cluster to join ('auto', or HOST:6379 of `ray start "
                              "--head`); default: $RAY_ADDRESS, else a local one-node cluster")
    cluster.add_argument("--app-name", default="gpt2onnx", help="Serve application name")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """(the Ray CLI's own options, the ``configs_from_args`` dict)."""
    ray_args, rest = ray_parser().parse_known_args(argv)
    serve_args = single_machine.parse_args(rest)  # exits 2 with its usage on a bad option
    args = {key: getattr(serve_args, key) for key in SERVE_OPTIONS}
    # The folder as seen from here: replicas on this machine or any other use this path.
    args["model_dir"] = serve_args.model_dir.resolve()
    args.update({key: getattr(ray_args, key) for key in RAY_OPTIONS})
    ray_args.host, ray_args.port, ray_args.log_level = (serve_args.host, serve_args.port,
                                                        serve_args.log_level)
    return ray_args, args


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    options, args = parse_args(argv)
    logging.basicConfig(level=options.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from gpt2onnx.serve.ray import deployment
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    replica, scaling = configs_from_args(args)  # a Gpt2OnnxError: run_main's one line
    app = deployment.application(replica, scaling)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deployment.run(app, name=options.app_name, host=options.host,
                             port=options.port, address=options.address)
    except RuntimeError as exc:  # a replica failed to start: Serve says why
        print(f"error: the deployment failed: {exc}", file=sys.stderr)
        deployment.shutdown(options.app_name)
        return 1
    count = (f"{scaling.num_replicas} replica(s)" if not scaling.autoscaling else
             f"{scaling.min_replicas}..{scaling.max_replicas} replicas (autoscaling)")
    print(f"serving {replica.model_name} on {url} with {count}; Ctrl-C stops it",
          flush=True)
    stop.wait()
    # Serve drains each replica (up to --shutdown-timeout) before stopping it.
    deployment.shutdown(options.app_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
