"""The option table: every option once, and everything derived from it.

`Config`'s class body *is* the table. Each attribute is written once, with its type, its default
(as the text a user would type), its parser, its help and the commands that take it; from it
come `Config(**values)`, the `DRAINCTL_*` variables, the fast parser (cli/fastparse.py), the typer
parameters and `--help` (cli/app.py), and README.md's options table (`readme_table()`, checked by
a test). Adding an option means adding one `option(...)` line here.

`resolve()` turns flags plus environment into a validated `Config`; flags win over the
environment. Every bad value raises `ConfigError` with one line that names the flag or variable:
the CLI prints it and exits 2. Parsers accept ASCII only where a number or a name is expected
(`str.isdigit` would take Arabic-Indic digits or "²"), and every duration has a maximum.

No typing, dataclasses or urllib at run time: `run` (PID 1) and `prestop` import this module at
start-up (benchmarks/bench_startup.py measures it); the names below exist for mypy alone.
"""

from __future__ import annotations

import os
import signal
from types import MappingProxyType

from drainctl.durations import DAY, DurationError, format_duration, parse_duration
from drainctl.events import LOG_FORMATS
from drainctl.redact import redact_url

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, dataclass_transform

    RawValue = str | bool | Sequence[str] | None
    Parser = Callable[[Any, str], Any]
else:
    def dataclass_transform(**_kwargs):  # at run time a no-op: mypy reads the real one
        return lambda decorated: decorated

__all__ = [
    "OPTIONS",
    "Config",
    "ConfigError",
    "Option",
    "parse_count",
    "parse_down_url",
    "parse_exit_code_map",
    "parse_port",
    "parse_ports",
    "parse_signal",
    "readme_table",
    "resolve",
    "split_commas",
]

# The commands that take an option unless its row says otherwise.
DRAIN = ("run", "prestop", "check")
RUN = ("run",)
# The connection count's poll: below this it is a busy loop, above it a drain would not notice
# the last connection closing for a long time.
POLL_MIN = 0.01
POLL_MAX = 60.0


class ConfigError(ValueError):
    """A bad option value; its message is the one line the user sees."""


# ---- parsers: (text or list of texts, where) -> value; `where` names the flag or variable -------


class Duration:
    """A duration parser with its bounds, which the help and the README state."""

    __slots__ = ("maximum", "minimum", "optional", "positive")

    def __init__(self, maximum: float = DAY, minimum: float = 0.0, positive: bool = False,
                 optional: bool = False) -> None:
        self.maximum = maximum
        self.minimum = minimum
        self.positive = positive
        self.optional = optional  # "", "off", "none": not set (None)

    def __call__(self, text: str, where: str) -> float | None:
        if self.optional and text.strip().lower() in ("", "off", "none"):
            return None
        try:
            return parse_duration(text, where, maximum=self.maximum, minimum=self.minimum,
                                  positive=self.positive)
        except DurationError as exc:
            raise ConfigError(str(exc)) from None

    def limits(self) -> str:
        low = (f"at least {format_duration(self.minimum)}, " if self.minimum
               else "more than 0, " if self.positive else "")
        return f"{low}at most {format_duration(self.maximum)}"


def _ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_signal(text: str, where: str = "signal") -> signal.Signals:
    """`SIGTERM`, `TERM`, `term` or `15` -> signal.SIGTERM."""
    raw = text.strip()
    try:
        if _ascii_digits(raw) and len(raw) <= 3:
            return signal.Signals(int(raw))
        if raw.isascii() and raw.isalnum():
            name = raw.upper()
            return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        pass
    raise ConfigError(f"{where}: {text!r} is not a signal name or number")


def parse_count(text: str, where: str, low: int, high: int) -> int:
    """A whole number in [low, high], written with ASCII digits."""
    raw = text.strip()
    if not _ascii_digits(raw) or len(raw) > 6 or not low <= int(raw) <= high:
        raise ConfigError(f"{where}: {text!r} is not a whole number from {low} to {high}")
    return int(raw)


def parse_port(text: str, where: str = "port") -> int:
    raw = text.strip()
    if not _ascii_digits(raw) or len(raw) > 5 or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not a TCP port (1-65535)")
    return int(raw)


def split_commas(items: Sequence[str]) -> list[str]:
    """`["80,443", " 8080 "]` -> `["80", "443", "8080"]`: repeatable flags and comma lists."""
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def parse_ports(items: Sequence[str], where: str = "port") -> tuple[int, ...]:
    return tuple(sorted({parse_port(item, where) for item in split_commas(items)}))


def parse_exit_code_map(items: Sequence[str], where: str = "exit-code-map") -> dict[int, int]:
    mapping: dict[int, int] = {}
    for item in split_commas(items):
        source, sep, target = (part.strip() for part in item.partition(":"))
        if (not sep or not _ascii_digits(source) or not _ascii_digits(target)
                or len(source) > 3 or len(target) > 3):
            raise ConfigError(f"{where}: {item!r} is not FROM:TO (e.g. 143:0)")
        a, b = int(source), int(target)
        if a > 255 or b > 255:
            raise ConfigError(f"{where}: {item!r}: exit codes are 0-255")
        mapping[a] = b
    return mapping


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                        "._~%!$&'()*+,;=-")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


def _url_text(text: str) -> bool:
    """Printable ASCII without space: what a URL or a request path may hold unencoded."""
    return text.isascii() and text.isprintable() and " " not in text


def parse_down_url(text: str, where: str = "down URL") -> str | None:
    """A URL the down call can be made to, or None for "" (no call). Parsed by hand, not with
    urllib or httpx: this runs at PID 1's start-up. ASCII only (non-ASCII: percent-encode it)."""
    url = text.strip()
    if not url:
        return None
    if not _url_text(url):
        raise ConfigError(f"{where}: {redact_url(text)!r} must be printable ASCII without spaces "
                          "(percent-encode anything else)")
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme[:1].isalpha() or not all(ch.isalnum() or ch in "+.-"
                                                      for ch in scheme):
        raise ConfigError(f"{where}: {redact_url(text)!r} is not a URL (e.g. http://127.0.0.1:8080/down)")
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"{where}: {redact_url(text)!r} must use http or https "
                          f"(scheme: {scheme})")
    ends = [i for i in map(rest.find, "/?#") if i >= 0]
    hostport = rest[: min(ends, default=len(rest))].rpartition("@")[2]
    host, _, port = hostport.partition(":")
    if hostport.startswith("["):  # an IPv6 address: [::1]:8080
        end = hostport.find("]") + 1
        host, port = hostport[:end], hostport[end:]
        if not end or (port and not port.startswith(":")):
            host = ""
        port = port[1:]
    if host.startswith("["):
        valid = len(host) > 2 and all(ch in _IPV6_CHARS for ch in host[1:-1])
    else:  # a name within DNS's limits (RFC 1035), or an IPv4 address
        valid = (bool(host) and all(ch in _HOST_CHARS for ch in host) and len(host) <= 253
                 and all(len(label) <= 63 for label in host.split(".")))
    if not valid:
        raise ConfigError(f"{where}: {redact_url(text)!r} has no valid host")
    if port and (not _ascii_digits(port) or len(port) > 5 or not 1 <= int(port) <= 65535):
        raise ConfigError(f"{where}: {redact_url(text)!r}: the port must be 1-65535")
    return url


def _probe_path(text: str, where: str) -> str:
    path = text.strip()
    if not path.startswith("/") or not _url_text(path):
        raise ConfigError(f"{where}: {text!r} must start with / and be printable ASCII "
                          "without spaces")
    return path


def _method(text: str, where: str) -> str:
    method = text.strip()
    if not method.isascii() or not method.isalpha() or len(method) > 32:
        raise ConfigError(f"{where}: {text!r} is not an HTTP method")
    return method.upper()


def _path(text: str, where: str) -> str | None:
    """A file path or socket name; empty: not set."""
    path = text.strip()
    if "\0" in path:
        raise ConfigError(f"{where}: {text!r} contains a NUL byte")
    return path or None


def _socket(text: str, where: str) -> str | None:
    """A socket path, or @NAME (abstract, UTF-8); empty: the default. At most 107 bytes, what
    sun_path holds (unix(7)), so a bad name is a usage error, not a failure at bind or connect."""
    address = _path(text, where)
    if address is None:
        return None
    try:
        size = (len(address[1:].encode()) if address.startswith("@")
                else len(os.fsencode(address)))
    except UnicodeError:
        raise ConfigError(f"{where}: {text!r}: an abstract socket name must be UTF-8") from None
    if size > 107:
        raise ConfigError(f"{where}: {text!r} is longer than a socket address (107 bytes)")
    return address


def _log_format(text: str, where: str) -> str:
    fmt = text.strip().lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(LOG_FORMATS)}")
    return fmt


def _flag_text(text: str, where: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{where}: {text!r} is not a boolean (true/false)")


# ---- the table's rows ---------------------------------------------------------------------------


class Option:
    """One command-line option: `--flag`, its `DRAINCTL_*` variable, and the attribute it sets.

    kind: "value" (one text), "multi" (repeatable flag; the variable takes a comma list) or
    "flag" (a switch: sets the attribute to `when_set`; its variable takes true/false).
    """

    __slots__ = ("attr", "commands", "default", "env", "help", "kind", "name", "parse",
                 "when_set")

    def __init__(self, name: str, kind: str, parse: Parser | None, default: str | None,
                 help: str, commands: tuple[str, ...], env: str | None,
                 when_set: object = True) -> None:
        self.name = name  # python name; the flag is --name-with-dashes
        self.attr = name  # the Config attribute (set by the table)
        self.kind = kind
        self.parse = parse
        self.default = default  # as typed by a user; None: no default text
        self.help = help
        self.commands = commands
        self.env = env or "DRAINCTL_" + name.upper()
        self.when_set = when_set

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def full_help(self) -> str:
        """The help with the bounds the parser enforces (shown by --help and the README)."""
        if isinstance(self.parse, Duration):
            limits = self.parse.limits()
            return f"{self.help} {limits[0].upper()}{limits[1:]}."
        return self.help

    def convert(self, value: RawValue, where: str) -> object:
        """A flag's value (str, list of str, True) or a variable's text -> the attribute's."""
        if self.kind == "flag":
            on = value if isinstance(value, bool) else _flag_text(str(value), where)
            return self.when_set if on else _UNSET
        assert self.parse is not None
        if self.kind == "multi":
            items = [value] if isinstance(value, str) else list(value or ())  # type: ignore[arg-type]
            return self.parse(items, where)
        return self.parse(value, where)


_UNSET = object()


class _Field:
    __slots__ = ("empty", "options")

    def __init__(self, options: list[Option], empty: object) -> None:
        self.options = options
        self.empty = empty


def option(
    *,
    default: str | None = None,
    parse: Parser | None = None,
    help: str,
    kind: str = "value",
    empty: object = None,
    name: str | None = None,
    env: str | None = None,
    commands: tuple[str, ...] = DRAIN,
    off: tuple[str, str] | None = None,
) -> Any:
    """One row of the table, in Config's class body (the attribute's name is the option's).

    default: the default as a user would type it, parsed once for Config; None: `empty` is the
    default. name: the flag's name when it differs from the attribute (`--port` -> `ports`).
    off: (name, help) of a switch that sets the attribute to None (`--no-probe`).
    """
    row = Option(name or "", kind, parse, default, help, commands, env)
    rows = [row]
    if off is not None:
        rows.append(Option(off[0], "flag", None, None, off[1], commands, None, when_set=None))
    return _Field(rows, empty)


@dataclass_transform(kw_only_default=True, field_specifiers=(option,))
def _table(cls: type[Any]) -> type[Any]:
    """Turn the class body's rows into OPTIONS and a plain __slots__ class with the defaults."""
    options: list[Option] = []
    defaults: dict[str, object] = {}
    for attr, field in list(vars(cls).items()):
        if not isinstance(field, _Field):
            continue
        for row in field.options:
            if not row.name:  # the attribute's own row, named after it
                row.name = attr
                if row.env == "DRAINCTL_":
                    row.env += attr.upper()
            row.attr = attr
            options.append(row)
        main = field.options[0]
        defaults[attr] = (field.empty if main.default is None
                          else main.convert(main.default, f"default of {main.flag}"))

    def __init__(self: Any, **values: object) -> None:
        unknown = values.keys() - defaults.keys()
        if unknown:
            raise TypeError(f"Config: unknown option {sorted(unknown)[0]!r}")
        for attr, default in defaults.items():
            setattr(self, attr, values.get(attr, default))
        if not isinstance(self.exit_code_map, MappingProxyType):
            self.exit_code_map = dict(self.exit_code_map)

    def __repr__(self: Any) -> str:
        fields = ", ".join(f"{attr}={getattr(self, attr)!r}" for attr in defaults)
        return f"{cls.__name__}({fields})"

    namespace = {"__slots__": tuple(defaults), "__init__": __init__, "__repr__": __repr__,
                 "__doc__": cls.__doc__, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "_options": tuple(options),
                 "_defaults": MappingProxyType(defaults)}
    return type(cls.__name__, (), namespace)


@_table
class Config:
    """Validated settings, read by the drain and its hosts. The class body is the option table."""

    delay: float = option(
        default="5s", parse=Duration(),
        help="Wait this long after the trigger, before anything else, so endpoint removal "
             "reaches kube-proxy and load balancers.")
    down_url: str | None = option(
        parse=parse_down_url,
        help="URL called to tell the app it is going down, e.g. "
             "http://127.0.0.1:8080/ok.htm?down=true; printable ASCII (percent-encode the "
             "rest). Unset or empty: no call. Checked at start-up.")
    down_method: str = option(default="GET", parse=_method, help="HTTP method for the down call.")
    down_timeout: float = option(
        default="5s", parse=Duration(maximum=3600.0),
        help="Timeout of one down-call attempt, end to end (name resolution, connect, TLS, "
             "headers and body); refused, reset, timeout and 5xx are retried with back-off "
             "inside the budget; a failed call is logged and the drain goes on.")
    ports: tuple[int, ...] = option(
        name="port", kind="multi", parse=parse_ports, empty=(), env="DRAINCTL_PORTS",
        help="A port whose established inbound TCP connections must drain (repeatable; "
             "DRAINCTL_PORTS takes a comma list). Default: the ports drainctl's processes listen "
             "on when the drain starts (looked up once more if none; README, 'Auto ports').")
    drain_timeout: float | None = option(
        parse=Duration(optional=True),
        help="Longest wait for connections to reach zero. Default: what the grace budget "
             "leaves.")
    settle: float = option(
        default="1s", parse=Duration(maximum=3600.0),
        help="The count must stay at zero this long to count as drained.")
    poll_interval: float = option(
        default="100ms", parse=Duration(maximum=POLL_MAX, minimum=POLL_MIN),
        help="How often connections are counted while draining (never when idle).")
    grace_period: float = option(
        default="30s", parse=Duration(positive=True),
        help="The pod's terminationGracePeriodSeconds; the whole sequence is fitted inside it "
             "(outside Kubernetes: the runtime's stop timeout, docker stop: 10s).")
    stop_signal: signal.Signals = option(
        default="SIGTERM", parse=parse_signal,
        help="Signal the app gets once drained (name or number).")
    stop_timeout: float = option(
        default="10s", parse=Duration(),
        help="How long the app may take to exit after the stop signal before SIGKILL.")
    idle_grace: float | None = option(
        parse=Duration(optional=True),
        help="A connection idle this long (no data either way, empty queues, and its last "
             "request answered) stops holding the drain. Default: off.")
    close_idle: bool = option(
        kind="flag", empty=False,
        help="After the delay (and the down call), close each keep-alive connection of the "
             "app's ports between requests, with the app's next answer (or after a second "
             "unused), so that no request meets the close: for apps that cannot be changed "
             "(needs CAP_SYS_PTRACE or the app's uid; README, '--close-idle').")
    probe_path: str | None = option(
        default="/", parse=_probe_path, off=("no_probe", "Skip that check."),
        help="After a successful down call, one keep-alive request to this path checks that "
             "the app now answers 'Connection: close'.")
    control_socket: str | None = option(
        parse=_socket, commands=("run", "prestop", "status", "check"),
        help="Where `run` listens for `prestop` and `status`: a path, or @NAME for an abstract "
             "socket. Default: an abstract name unique to the container's mount namespace (no "
             "file needed; see docs/control.md).")
    termination_log: str | None = option(
        default="/dev/termination-log", parse=_path,
        help="Where the drain's summary is appended, if that file exists, is a regular file "
             "and is writable; empty: off.")
    log_format: str = option(
        default="auto", parse=_log_format,
        commands=("run", "prestop", "check", "status", "connections"),
        help="json, text, or auto (text on a terminal, JSON otherwise).")
    single_child: bool = option(
        kind="flag", empty=False, commands=RUN,
        help="Signal the direct child only, not its process group.")
    exit_code_map: Mapping[int, int] = option(
        kind="multi", parse=parse_exit_code_map, empty=MappingProxyType({}), commands=RUN,
        help="Remap the app's exit codes, e.g. 143:0 (repeatable or comma list).")


OPTIONS: tuple[Option, ...] = Config._options  # type: ignore[attr-defined]


def resolve(raw: Mapping[str, RawValue], environ: Mapping[str, str] | None = None) -> Config:
    """Flags (`raw`, by option name; None, False or [] = not given) + environment -> Config.

    Only the options present in `raw` are read, so each command takes just its own. Rows are
    taken in table order, so a switch such as --no-probe overrides the value before it.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for row in OPTIONS:
        if row.name not in raw:
            continue
        given = raw[row.name]
        if given is None or given is False or (not isinstance(given, str | bool) and not given):
            if row.env not in env:
                continue
            value = row.convert(env[row.env], row.env)
        else:
            value = row.convert(given, row.flag)
        if value is not _UNSET:
            values[row.attr] = value
    return Config(**values)  # type: ignore[arg-type]


def readme_table() -> str:
    """README.md's options table (a test checks that the README holds exactly this)."""
    lines = ["| option | variable | default | commands | meaning |", "|---|---|---|---|---|"]
    defaults = {"ports": "auto", "drain_timeout": "what the budget leaves", "idle_grace": "off",
                "control_socket": "per container", "down_url": "none"}
    for row in OPTIONS:
        if row.kind == "flag" and row.when_set is None:
            continue  # shown with the value it switches off
        switches = [other for other in OPTIONS if other.attr == row.attr and other is not row]
        flags = " / ".join(f"`{each.flag}`" for each in (row, *switches))
        flags += " (repeatable)" if row.kind == "multi" else ""
        env = " / ".join(f"`{each.env}`" for each in (row, *switches))
        env += " (comma list)" if row.kind == "multi" else ""
        default = (f"`{row.default}`" if row.default is not None
                   else defaults.get(row.attr, "off"))
        meaning = " ".join([row.full_help(), *(each.help for each in switches)])
        lines.append(f"| {flags} | {env} | {default} | {', '.join(row.commands)} | "
                     f"{meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(readme_table(), end="")
