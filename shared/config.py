"""Configuration of the edge agent and the cloud worker: TOML file, environment, command line.

Precedence, per key: command-line flag > ``SPECECD_<KEY>`` environment variable > config file >
built-in default. Every key has the same name in all three places (``gamma`` in the file,
``SPECECD_GAMMA``, ``--gamma``). A file may hold flat keys, or common keys at the top with
``[edge]`` / ``[worker]`` sections, so one file can serve both sides. Values are validated on
load; a bad one raises ``ConfigError(key, value, allowed)``. Secrets (``password``,
``hf_token``) come from the environment or from ``*_file`` keys and are held in ``Secret``,
whose repr and str are masked. ``deploy/README.md`` documents every key.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config_keys import (
    ENV_PREFIX,
    KEYS,
    KINDS,
    MASK,
    SECRET_PAIRS,
    BadValue,
    HostPort,
    Secret,
    check_kind,
    env_name,
    flag_name,
    help_text,
    keys_for,
)
from shared.errors import ConfigError
from shared.sampling import SamplingParams

__all__ = [
    "KEYS",
    "BrokerSettings",
    "EdgeConfig",
    "HostPort",
    "Secret",
    "WorkerConfig",
    "add_broker_arguments",
    "add_config_arguments",
    "add_version_argument",
    "apply_environment",
    "broker_settings_from_args",
    "config_from_args",
    "env_name",
    "flag_name",
    "keys_for",
    "load_config",
    "load_edge_config",
    "load_worker_config",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """How to reach the MQTT broker. TLS is on when ``tls_ca`` or ``tls_cert`` is set."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: Secret | None = None
    password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    @property
    def address(self) -> str:
        return str(HostPort(self.host, self.port))


@dataclass(frozen=True, kw_only=True)
class EdgeConfig:
    """Settings of ``spececd-edge``. ``device`` is the MQTT username unless set."""

    broker: BrokerSettings
    device: str | None
    draft: str
    target: str
    draft_backend: str
    draft_threads: int
    model_device: str
    dtype: str
    gamma: int | str  # 1..64 or "auto"
    pipeline: bool
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    mode: str
    on_cloud_unreachable: str
    round_timeout_ms: int
    listen: HostPort
    max_queue: int
    max_concurrent: int
    model_name: str
    max_body_bytes: int
    log_level: str
    log_json: bool
    watchdog: bool
    cache: str | None
    allow_download: bool
    hf_token: Secret | None
    hf_token_file: str | None
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed
        )


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """Settings of ``spececd-worker``. ``worker_id`` is the MQTT username unless set."""

    broker: BrokerSettings
    worker_id: str
    draft: str
    target: str
    model_device: str
    dtype: str
    max_sessions: int
    metrics_listen: HostPort | None
    max_batch_tokens: int = 512
    max_batch_sessions: int = 32
    batch_window_ms: float | str = "auto"  # or ms
    width_rule: str = "ratio"
    batch_layout: str = "padded"
    shared_prefill_tokens: int | str = "auto"  # or positions
    fair_wait_ms: float = 20.0
    max_cached_tokens: int = 1 << 20
    max_sessions_per_device: int = 0
    max_opens_per_s_per_device: float = 20.0
    cpu_linear: str = "onednn"
    invariant: str = "auto"
    log_level: str
    log_json: bool
    cache: str | None
    allow_download: bool
    hf_token: Secret | None
    hf_token_file: str | None
    sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)


def _unknown(key: str, value: Any, kind: str, where: str) -> ConfigError:
    names = keys_for(kind)
    other = next(k for k in KINDS if k != kind)
    if key in KEYS:
        hint = f"it is a {other} key (in a shared file put it under [{other}])."
    else:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "check the spelling."
    shown = MASK if KEYS.get(key) is not None and KEYS[key].secret else value
    return ConfigError(
        key, shown, f"a key of the {kind} config ({where}); {hint} Known keys: {', '.join(names)}"
    )


# ---------------------------------------------------------------- layers
def _file_layer(path: str, kind: str) -> dict[str, tuple[Any, str]]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", path, "an existing TOML file (check --config / SPECECD_CONFIG)") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("config", path, f"a readable TOML file ({exc})") from exc
    where = f"file {path}"
    flat = {k: v for k, v in data.items() if k not in KINDS}
    section = data.get(kind, {})
    for name in KINDS:
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(name, data[name], f"a [{name}] table of keys ({where})")
    out: dict[str, tuple[Any, str]] = {}
    base = Path(path).resolve().parent
    for scope, table in (("", flat), (f"[{kind}] ", section)):
        for key, value in table.items():
            if key not in KEYS or kind not in KEYS[key].kinds:
                raise _unknown(key, value, kind, f"{scope}in {where}")
            if KEYS[key].path and isinstance(value, str) and value and not os.path.isabs(value):
                value = str(base / value)
            out[key] = (value, where)
    return out


def _env_layer(env: Mapping[str, str], kind: str) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in KEYS:
            close = difflib.get_close_matches(key, list(KEYS), n=1)
            hint = f" (did you mean {env_name(close[0])}?)" if close else ""
            log.warning("ignoring unknown environment variable %s%s", name, hint)
        elif kind in KEYS[key].kinds:
            out[key] = (value, f"environment variable {name}")
    return out


def _override_layer(overrides: Mapping[str, Any], kind: str) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for key, value in overrides.items():
        if key not in KEYS or kind not in KEYS[key].kinds:
            raise _unknown(key, value, kind, "in overrides")
        if value is not None:
            out[key] = (value, f"flag {flag_name(key)}")
    return out


def _merge(layers: list[dict[str, tuple[Any, str]]]) -> dict[str, tuple[Any, str]]:
    merged: dict[str, tuple[Any, str]] = {}
    for layer in layers:
        for secret, file_key in SECRET_PAIRS.items():
            if secret in layer and file_key in layer:
                src = layer[secret][1]
                raise ConfigError(secret, MASK, f"either {secret} or {file_key}, not both ({src})")
            if secret in layer or file_key in layer:  # one logical setting: a higher layer replaces both
                merged.pop(secret, None)
                merged.pop(file_key, None)
        merged.update(layer)
    return merged


# ---------------------------------------------------------------- resolve and build
def _read_secret_file(key: str, path: str, src: str, *, empty_ok: bool = False) -> Secret | None:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, path, f"a readable file holding the secret ({exc.strerror}; {src})") from exc
    if not text and empty_ok:
        return None
    if not text:
        raise ConfigError(key, path, f"a file holding a non-empty secret; it is empty ({src})")
    return Secret(text)


def _resolve(
    kind: str, merged: dict[str, tuple[Any, str]], names: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in keys_for(kind) if names is None else names:
        spec = KEYS[name]
        if name not in merged:
            raw, src, text = spec.default, "default", True
            if raw is None:
                values[name], sources[name] = None, src
                continue
        else:
            raw, src = merged[name]
            text = not src.startswith("file ")
        try:
            value = spec.parse(raw, text)
        except BadValue as bad:
            shown = MASK if spec.secret else raw
            raise ConfigError(name, shown, f"{bad} (from {src})") from None
        values[name] = Secret(value) if spec.secret else value
        sources[name] = src
    if values.get("model_device") is not None:
        _check_model_device(values["model_device"], sources["model_device"])
    for path_key in ("password_file", "tls_ca", "tls_cert", "tls_key", "hf_token_file"):
        path = values.get(path_key)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(path_key, path, f"an existing file (from {sources[path_key]})")
    for secret, file_key in SECRET_PAIRS.items():
        if values.get(file_key) is not None:
            # an empty hf_token_file means "no token" (compose mounts the secret either way)
            values[secret] = _read_secret_file(
                file_key, values[file_key], sources[file_key], empty_ok=secret == "hf_token"
            )
            sources[secret] = sources[file_key]
    return values, sources


def _check_model_device(device: str, src: str) -> None:
    """Refuse a torch device this machine does not have now, not after loading a model."""
    if device in ("auto", "cpu"):
        return
    import torch  # only for a GPU device: the config check stays light otherwise

    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(
                "model_device",
                device,
                f"a device this machine has: no MPS here; use 'auto' or 'cpu' (from {src})",
            )
        return
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise ConfigError(
            "model_device",
            device,
            f"a device this machine has: {have} here; use 'auto' or 'cpu' (from {src})",
        )


def default_name() -> str:
    """The host name as a topic-safe name: the default worker id and device name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
    return name or "spececd"


def _broker(values: dict[str, Any], sources: dict[str, str]) -> BrokerSettings:
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        key = "tls_key" if values["tls_key"] is None else "tls_cert"
        raise ConfigError(key, None, "set both tls_cert and tls_key (a client certificate) or neither")
    tls = values["tls_ca"] is not None or values["tls_cert"] is not None
    if values["tls_insecure"] and not tls:
        raise ConfigError("tls_insecure", True, "true only with TLS on (set tls_ca, or tls_cert and tls_key)")
    if values["password"] is not None and values["username"] is None:
        raise ConfigError("username", None, f"a username when a password is set ({sources['password']})")
    host, port = values["broker"]
    return BrokerSettings(
        host=host,
        port=port if port is not None else (8883 if tls else 1883),
        username=values["username"],
        password=values["password"],
        password_file=values["password_file"],
        tls_ca=values["tls_ca"],
        tls_cert=values["tls_cert"],
        tls_key=values["tls_key"],
        tls_insecure=values["tls_insecure"],
        keepalive=values["keepalive"],
    )


def _common(values: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    return dict(
        broker=_broker(values, sources),
        draft=values["draft"],
        target=values["target"],
        model_device=values["model_device"],
        dtype=values["dtype"],
        log_level=values["log_level"].upper(),
        log_json=values["log_json"],
        cache=values["cache"],
        allow_download=values["allow_download"],
        hf_token=values["hf_token"],
        hf_token_file=values["hf_token_file"],
        sources=sources,
    )


def _hostport_of(value: tuple[str, int] | None) -> HostPort | None:
    return None if value is None else HostPort(*value)


def _layers(kind: str, path: str | None, env: Mapping[str, str], overrides: Mapping[str, Any] | None):
    path = path if path is not None else env.get(ENV_PREFIX + "CONFIG") or None
    layers = [_file_layer(path, kind)] if path else []
    layers += [_env_layer(env, kind), _override_layer(overrides or {}, kind)]
    return _resolve(kind, _merge(layers))


def load_edge_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> EdgeConfig:
    """Load the edge config: ``overrides`` (CLI) > ``env`` (``SPECECD_*``) > TOML file at ``path``
    (else ``$SPECECD_CONFIG``) > defaults. Raises ``ConfigError`` naming the key, value and what is
    allowed. ``overrides`` values that are None are ignored (unset flags)."""
    values, sources = _layers("edge", path, os.environ if env is None else env, overrides)
    # a device with a username is that name on the broker; an anonymous dev broker takes the host name
    device = values["device"] or values["username"] or default_name()
    target = values["target"]
    return EdgeConfig(
        **_common(values, sources),
        draft_backend=values["draft_backend"],
        draft_threads=values["draft_threads"],
        device=device,
        gamma=values["gamma"],
        pipeline=values["pipeline"],
        max_new_tokens=values["max_new_tokens"],
        temperature=values["temperature"],
        top_p=values["top_p"],
        top_k=values["top_k"],
        seed=values["seed"],
        mode=values["mode"],
        on_cloud_unreachable=values["on_cloud_unreachable"],
        round_timeout_ms=values["round_timeout_ms"],
        listen=_hostport_of(values["listen"]),
        max_queue=values["max_queue"],
        max_concurrent=values["max_concurrent"],
        model_name=values["model_name"] or Path(target.rstrip("/")).name or target,
        max_body_bytes=values["max_body_bytes"],
        watchdog=values["watchdog"],
    )


_WORKER_BATCH_KEYS = (
    "max_batch_tokens",
    "max_batch_sessions",
    "batch_window_ms",
    "width_rule",
    "batch_layout",
    "shared_prefill_tokens",
    "fair_wait_ms",
    "max_cached_tokens",
    "max_sessions_per_device",
    "max_opens_per_s_per_device",
    "cpu_linear",
    "invariant",
)  # the worker's scheduling, quota and kernel keys, passed through as they are


def load_worker_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> WorkerConfig:
    """Load the worker config, with the same precedence as ``load_edge_config``."""
    values, sources = _layers("worker", path, os.environ if env is None else env, overrides)
    return WorkerConfig(
        **_common(values, sources),
        worker_id=values["worker_id"] or values["username"] or default_name(),
        max_sessions=values["max_sessions"],
        metrics_listen=_hostport_of(values["metrics_listen"]),
        **{k: values[k] for k in _WORKER_BATCH_KEYS},
    )


def load_config(
    kind: str,
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> EdgeConfig | WorkerConfig:
    """``load_edge_config`` or ``load_worker_config`` by ``kind``."""
    check_kind(kind)
    loader = load_edge_config if kind == "edge" else load_worker_config
    return loader(path, env=env, overrides=overrides)


# ---------------------------------------------------------------- command line
BROKER_KEYS = (
    "broker",
    "username",
    "password_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_insecure",
    "keepalive",
)


def _add_key_argument(group: argparse._ArgumentGroup, name: str) -> None:
    """One key's flag (and its aliases) from the table; it defaults to None (= unset)."""
    spec = KEYS[name]
    flags = [flag_name(name), *spec.aliases]
    if spec.is_bool:
        group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text(name))
        return
    metavar = "HOST:PORT" if spec.parse is KEYS["broker"].parse or "listen" in name else name.upper()
    if spec.choices:
        metavar = "{" + ",".join(spec.choices) + "}"
    group.add_argument(*flags, dest=name, metavar=metavar, default=None, help=help_text(name))


def add_config_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """Add ``--config`` and one flag per key of ``kind`` (secrets only as ``--*-file``).

    Every flag defaults to None, so an unset flag never overrides the environment or the file.
    Call it on each subcommand's parser, then ``config_from_args(args, kind)``."""
    check_kind(kind)
    group = parser.add_argument_group(
        f"{kind} configuration (flag > SPECECD_* env > --config file > default)"
    )
    group.add_argument("--config", metavar="FILE", default=None, help="TOML config file (env SPECECD_CONFIG)")
    for name in keys_for(kind):
        if not KEYS[name].secret:
            _add_key_argument(group, name)


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker-connection flags alone (for tools such as ``spececd-tap``), as in the table."""
    group = parser.add_argument_group("broker connection (flag > SPECECD_* env > default)")
    for name in BROKER_KEYS:
        _add_key_argument(group, name)


def broker_settings_from_args(
    args: argparse.Namespace, *, env: Mapping[str, str] | None = None
) -> BrokerSettings:
    """``BrokerSettings`` from ``add_broker_arguments`` flags and the ``SPECECD_*`` environment.

    The password comes from ``--password-file`` or ``SPECECD_PASSWORD``/``SPECECD_PASSWORD_FILE``."""
    env = os.environ if env is None else env
    names = [*BROKER_KEYS, "password"]
    env_layer = {k: v for k, v in _env_layer(env, "worker").items() if k in names}
    flags = {
        k: (getattr(args, k), f"flag {flag_name(k)}")
        for k in BROKER_KEYS
        if getattr(args, k, None) is not None
    }
    values, sources = _resolve("worker", _merge([env_layer, flags]), names)
    if values.get("password_file") is not None:
        values["password"] = _read_secret_file(
            "password_file", values["password_file"], sources["password_file"]
        )
        sources["password"] = sources["password_file"]
    return _broker(values, sources)


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """``--version``: the installed package's version."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")


def package_version() -> str:
    """SpecECD's version as installed (``0+unknown`` when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spececd")
    except PackageNotFoundError:
        return "0+unknown"


def config_from_args(
    args: argparse.Namespace, kind: str, *, env: Mapping[str, str] | None = None
) -> EdgeConfig | WorkerConfig:
    """Build the config of ``kind`` from parsed ``args`` (see ``add_config_arguments``)."""
    check_kind(kind)
    overrides = {
        k: getattr(args, k)
        for k in keys_for(kind)
        if not KEYS[k].secret and getattr(args, k, None) is not None
    }
    return load_config(kind, getattr(args, "config", None), env=env, overrides=overrides)


def apply_environment(cfg: EdgeConfig | WorkerConfig) -> None:
    """Hand the settings that libraries read from the environment to them: the model cache
    (``SPECECD_CACHE``, read by ``shared.models``) and the Hugging Face token (``HF_TOKEN``)."""
    if cfg.cache:
        os.environ["SPECECD_CACHE"] = cfg.cache
    if cfg.hf_token is not None:
        os.environ["HF_TOKEN"] = cfg.hf_token.reveal()
