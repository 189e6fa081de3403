"""Options, their environment variables, durations, and the grace-period budget.

One table (`OPTIONS`) describes every option once: its flag, its `DRAINCTL_*` variable, its
default and its help. The CLI builds its `--help` from it, and `resolve()` turns flags plus
environment into a validated `Config`. Flags win over the environment. Every bad value raises
`ConfigError` with one line that names the flag or variable: the CLI prints it and exits 2.
"""

from __future__ import annotations

import math
import os
import re
import signal
from collections.abc import Mapping, Sequence

__all__ = [
    "OPTIONS",
    "Config",
    "ConfigError",
    "Option",
    "env_name",
    "parse_duration",
    "parse_exit_code_map",
    "parse_port",
    "parse_signal",
    "resolve",
]


class ConfigError(ValueError):
    """A bad option value; its message is the one line the user sees."""


class Option:
    __slots__ = ("commands", "default", "env", "help", "kind", "name")

    def __init__(
        self,
        name: str,  # python name; the flag is --name-with-dashes
        help: str,
        default: str | None = None,
        kind: str = "value",  # "value", "flag" (boolean), "multi" (repeatable)
        commands: tuple[str, ...] = ("run", "prestop", "check"),
        env: str | None = None,  # overrides the derived DRAINCTL_<NAME>
    ) -> None:
        self.name = name
        self.help = help
        self.default = default
        self.kind = kind
        self.commands = commands
        self.env = env

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return self.env or env_name(self.name)


def env_name(name: str) -> str:
    return "DRAINCTL_" + name.upper()


_RUN = ("run",)
_ALL = ("run", "prestop", "check")

OPTIONS: tuple[Option, ...] = (
    Option("delay", "Wait this long after the trigger, before anything else, so endpoint removal "
           "reaches kube-proxy and load balancers.", "5s"),
    Option("down_url", "URL called to tell the app it is going down, e.g. "
           "http://127.0.0.1:8080/ok.htm?down=true. Unset: no call."),
    Option("down_method", "HTTP method for the down call.", "GET"),
    Option("down_timeout", "Timeout of one down-call attempt; a failed call is logged and the "
           "drain goes on.", "5s"),
    Option("port", "A port whose established inbound TCP connections must drain (repeatable; "
           "DRAINCTL_PORTS takes a comma list). Default: the ports the app's process tree "
           "listens on when the drain starts.", None, "multi", env="DRAINCTL_PORTS"),
    Option("drain_timeout", "Longest wait for connections to reach zero. Default: what the "
           "grace budget leaves."),
    Option("settle", "The count must stay at zero this long to count as drained.", "1s"),
    Option("poll_interval", "How often connections are counted while draining.", "100ms"),
    Option("grace_period", "The pod's terminationGracePeriodSeconds; the whole sequence is "
           "fitted inside it (outside Kubernetes: the runtime's stop timeout, docker stop: 10s).",
           "30s"),
    Option("stop_signal", "Signal the app gets once drained (name or number).", "SIGTERM"),
    Option("stop_timeout", "How long the app may take to exit after the stop signal before "
           "SIGKILL.", "10s"),
    Option("idle_grace", "A connection idle (no data either way, empty queues) this long stops "
           "holding the drain. Default: off."),
    Option("close_idle", "After the delay (and the down call), close each keep-alive connection "
           "of the app's ports the moment it is idle between requests, as the server's own "
           "keep-alive timeout would: for apps that cannot be changed (needs CAP_SYS_PTRACE or "
           "the app's uid; README.md, --close-idle).", None, "flag"),
    Option("probe_path", "After a successful down call, one keep-alive request to this path "
           "checks that the app now answers 'Connection: close'.", "/"),
    Option("no_probe", "Skip that check.", None, "flag"),
    Option("control_socket", "Where `run` listens for `prestop` and `status`: a path, or @NAME "
           "for an abstract socket. Default: an abstract name unique to the container's mount "
           "namespace (no file needed; see docs/control.md).", None,
           commands=("run", "prestop", "status", "check")),
    Option("termination_log", "Where the drain's summary is written, if that file exists and is "
           "writable; empty: off.", "/dev/termination-log",
           commands=("run", "prestop", "check")),
    Option("log_format", "json, text, or auto (text on a terminal, JSON otherwise).", "auto",
           commands=("run", "prestop", "check", "status", "connections")),
    Option("single_child", "Signal the direct child only, not its process group.", None, "flag",
           commands=_RUN),
    Option("exit_code_map", "Remap the app's exit codes, e.g. 143:0 (repeatable or comma list).",
           None, "multi", commands=_RUN),
)
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, what: str = "duration") -> float:
    """`250ms`, `15s`, `2m`, `1h` or plain seconds (`1.5`) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(
            f"{what}: {text!r} is not a duration (use e.g. 500ms, 15s, 2m, or seconds)"
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):
        raise ConfigError(f"{what}: {text!r} is too large")
    return seconds


def parse_signal(text: str, what: str = "signal") -> signal.Signals:
    """`SIGTERM`, `TERM`, `term` or `15` -> signal.SIGTERM."""
    raw = text.strip()
    try:
        if raw.isdigit():
            return signal.Signals(int(raw))
        name = raw.upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise ConfigError(f"{what}: {text!r} is not a signal name or number") from None


def parse_port(text: str, what: str = "port") -> int:
    raw = text.strip()
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"{what}: {text!r} is not a TCP port (1-65535)")
    return int(raw)


def parse_exit_code_map(items: Sequence[str], what: str = "exit-code-map") -> dict[int, int]:
    mapping: dict[int, int] = {}
    for item in _split_commas(items):
        source, sep, target = item.partition(":")
        if not sep or not source.strip().isdigit() or not target.strip().isdigit():
            raise ConfigError(f"{what}: {item!r} is not FROM:TO (e.g. 143:0)")
        a, b = int(source), int(target)
        if a > 255 or b > 255:
            raise ConfigError(f"{what}: {item!r}: exit codes are 0-255")
        mapping[a] = b
    return mapping


def _split_commas(items: Sequence[str]) -> list[str]:
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


class Config:
    """Validated settings. A plain class, not a dataclass: `run` imports this module, and
    dataclasses (with inspect, ast, dis) cost PID 1 ~18 ms and 2 MiB (bench_startup.py)."""

    __slots__ = ("close_idle", "control_socket", "delay", "down_method", "down_timeout",
                 "down_url", "drain_timeout", "exit_code_map", "grace_period", "idle_grace",
                 "log_format", "poll_interval", "ports", "probe_path", "settle", "single_child",
                 "stop_signal", "stop_timeout", "termination_log")

    def __init__(
        self,
        *,
        delay: float = 5.0,
        down_url: str | None = None,
        down_method: str = "GET",
        down_timeout: float = 5.0,
        ports: tuple[int, ...] = (),  # empty: auto-detect
        drain_timeout: float | None = None,
        settle: float = 1.0,
        poll_interval: float = 0.1,
        grace_period: float = 30.0,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 10.0,
        idle_grace: float | None = None,
        probe_path: str | None = "/",  # None: no probe
        control_socket: str | None = None,
        termination_log: str | None = "/dev/termination-log",
        log_format: str = "auto",
        single_child: bool = False,
        exit_code_map: Mapping[int, int] | None = None,
        close_idle: bool = False,
    ) -> None:
        self.delay = delay
        self.down_url = down_url
        self.down_method = down_method
        self.down_timeout = down_timeout
        self.ports = ports
        self.drain_timeout = drain_timeout
        self.settle = settle
        self.poll_interval = poll_interval
        self.grace_period = grace_period
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.idle_grace = idle_grace
        self.probe_path = probe_path
        self.control_socket = control_socket
        self.termination_log = termination_log
        self.log_format = log_format
        self.single_child = single_child
        self.exit_code_map: Mapping[int, int] = dict(exit_code_map or {})
        self.close_idle = close_idle

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Config({fields})"



RawValue = str | bool | Sequence[str] | None


def resolve(
    raw: Mapping[str, RawValue], environ: Mapping[str, str] | None = None
) -> Config:
    """Flags (`raw`, by option name; None = not given) + environment -> Config.

    Only the options present in `raw` are read, so each command takes just its own.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, given in raw.items():
        option = OPTIONS_BY_NAME[name]
        source = option.flag
        value: RawValue = given
        if given is None or given == [] or given == () or given is False:
            if option.envvar in env:
                source, value = option.envvar, env[option.envvar]
            else:
                continue
        values[name] = _convert(option, value, source)
    return _build(values)


def _convert(option: Option, value: RawValue, source: str) -> object:
    if option.kind == "flag":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{source}: {value!r} is not a boolean (true/false)")
    if option.kind == "multi":
        if isinstance(value, str):
            return [value]
        return [str(item) for item in value or ()] if not isinstance(value, bool) else []
    assert isinstance(value, str)
    return (source, value)


def _build(values: Mapping[str, object]) -> Config:
    kwargs: dict[str, object] = {}

    def text(name: str) -> tuple[str, str] | None:
        item = values.get(name)
        return item if isinstance(item, tuple) else None

    for name in ("delay", "down_timeout", "settle", "poll_interval", "grace_period",
                 "stop_timeout"):
        item = text(name)
        if item is not None:
            kwargs[name] = parse_duration(item[1], item[0])
    for name in ("drain_timeout", "idle_grace"):
        item = text(name)
        if item is not None and item[1].strip().lower() not in ("", "off", "none"):
            kwargs[name] = parse_duration(item[1], item[0])
    if (item := text("down_url")) is not None and item[1].strip():
        from drainctl.drain.downcall import validate_down_url  # httpx-free, imports lazily

        try:
            kwargs["down_url"] = validate_down_url(item[1].strip())
        except ValueError as exc:
            raise ConfigError(f"{item[0]}: {exc}") from None
    if (item := text("down_method")) is not None:
        method = item[1].strip().upper()
        if not re.fullmatch(r"[A-Z]+", method):
            raise ConfigError(f"{item[0]}: {item[1]!r} is not an HTTP method")
        kwargs["down_method"] = method
    if (item := text("stop_signal")) is not None:
        kwargs["stop_signal"] = parse_signal(item[1], item[0])
    if (item := text("probe_path")) is not None:
        path = item[1].strip()
        if not path.startswith("/"):
            raise ConfigError(f"{item[0]}: {item[1]!r} must start with /")
        kwargs["probe_path"] = path
    if values.get("no_probe") is True:
        kwargs["probe_path"] = None
    if (item := text("control_socket")) is not None and item[1].strip():
        kwargs["control_socket"] = item[1].strip()
    if (item := text("termination_log")) is not None:
        kwargs["termination_log"] = item[1].strip() or None
    if (item := text("log_format")) is not None:
        fmt = item[1].strip().lower()
        if fmt not in ("auto", "json", "text"):
            raise ConfigError(f"{item[0]}: {item[1]!r} is not one of auto, json, text")
        kwargs["log_format"] = fmt
    if values.get("single_child") is True:
        kwargs["single_child"] = True
    if values.get("close_idle") is True:
        kwargs["close_idle"] = True
    ports = values.get("port")
    if isinstance(ports, list):
        kwargs["ports"] = tuple(
            sorted({parse_port(p, "--port/DRAINCTL_PORTS") for p in _split_commas(ports)})
        )
    codes = values.get("exit_code_map")
    if isinstance(codes, list):
        kwargs["exit_code_map"] = parse_exit_code_map(codes, "--exit-code-map")

    for name in ("grace_period", "poll_interval"):
        if name in kwargs and kwargs[name] == 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be greater than 0")
    return Config(**kwargs)  # type: ignore[arg-type]
