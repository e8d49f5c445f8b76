"""``spececd-worker``: load the target model, serve sessions over MQTT until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys

from cloud_worker import invariant
from cloud_worker.worker import Worker, connect_early, install_sigterm
from shared.config import add_config_arguments, add_version_argument, apply_environment, config_from_args
from shared.cpu_linear import cpu_computes_bf16, dtype_advice, use_onednn_linears
from shared.errors import SpecECDError
from shared.logs import register_secrets_of, setup_logging
from shared.models import load_model
from shared.mqtt import broker_config_from_settings, prefer_network_latency

log = logging.getLogger("spececd.worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spececd-worker",
        description="SpecECD cloud worker: verifies draft blocks from edge devices with the target model.",
    )
    add_version_argument(parser)
    add_config_arguments(parser, "worker")
    return parser


def main(argv: list[str] | None = None) -> int:
    prefer_network_latency()
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args, "worker")
    except SpecECDError as exc:
        print(f"spececd-worker: {exc}", file=sys.stderr)
        return 2
    register_secrets_of(cfg)
    setup_logging(cfg.log_level, json=cfg.log_json)
    apply_environment(cfg)
    metrics = None
    try:
        # The broker first (a wrong address or password fails now, not after the load), with the
        # retained status `loading`; metrics early too, so the healthcheck reads "not ready".
        broker = broker_config_from_settings(cfg.broker)
        client = connect_early(broker, worker_id=cfg.worker_id)
        if cfg.metrics_listen is not None:
            from shared.metrics import WorkerMetrics

            metrics = WorkerMetrics()
            metrics.watch_broker(client.connected.is_set)
            metrics.serve(cfg.metrics_listen.host, cfg.metrics_listen.port)
        log.info("loading target model %s", cfg.target)
        target = load_model(
            cfg.target, device=cfg.model_device, dtype=cfg.dtype, offline=not cfg.allow_download
        )
        if (advice := dtype_advice(target.device, target.dtype, native_bf16=cpu_computes_bf16())) is not None:
            log.info("target: %s", advice)
        if cfg.cpu_linear == "onednn":
            swapped = use_onednn_linears(target.model)
            log.info("target: %d linear layers through oneDNN (cpu_linear)", swapped)
        if invariant.wanted(cfg.invariant, target.device, target.dtype):
            log.info("target: %s", invariant.apply(target.model, target.vocab_size))
        worker = Worker(
            target,
            broker,
            worker_id=cfg.worker_id,
            draft_name=cfg.draft,
            max_sessions=cfg.max_sessions,
            max_batch_tokens=cfg.max_batch_tokens,
            max_batch_sessions=cfg.max_batch_sessions,
            batch_window_ms=cfg.batch_window_ms,
            width_rule=cfg.width_rule,
            batch_layout=cfg.batch_layout,
            shared_prefill_tokens=cfg.shared_prefill_tokens,
            fair_wait_ms=cfg.fair_wait_ms,
            max_cached_tokens=cfg.max_cached_tokens,
            max_sessions_per_device=cfg.max_sessions_per_device,
            max_opens_per_s_per_device=cfg.max_opens_per_s_per_device,
            metrics=metrics,
            client=client,
        )
        done = install_sigterm(worker)
        worker.start()
        if metrics is not None:
            metrics.watch_ready(worker.ready)
    except SpecECDError as exc:
        log.error("%s", exc)
        print(f"spececd-worker: {exc}", file=sys.stderr)
        return 1
    done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
