"""The option table, the exit-code table and bad input, for every command.

- The fast parser (`run`/`prestop` without typer) and the typer app give the same Config or the
  same error for every option of the table (Hypothesis over values).
- Any string in any option or variable of any command: a value, or one line `drainctl: ...` and
  exit 2, never a traceback. In process through `drainctl.__main__.main` (the commands' bodies
  after validation are replaced, so the fuzz does not start supervisors), and as real processes
  with non-UTF-8 argv and environment bytes.
- Durations: ASCII digits, a maximum each (README.md, "Options"), and the maximum works for real.
- README.md's options and exit-code tables are the ones the code holds.
"""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from drainctl import exitcodes
from drainctl.__main__ import main
from drainctl.cli import commands, fastparse
from drainctl.cli.app import app_main
from drainctl.durations import DAY, DurationError, format_duration, parse_duration
from drainctl.options import (
    OPTIONS,
    Config,
    ConfigError,
    Option,
    parse_down_url,
    readme_table,
    resolve,
)
from tests.conftest import ROOT, Processes, drainctl_argv

# ---- values to throw at the options -------------------------------------------------------------

TRICKY = [
    "", " ", "0", "1", "-1", "5s", "250ms", "1h30m", "24h", "24h1s", "1000h", "1e3", "nan", "inf",
    "-inf", "1.5", ".5", "5.", "0.001", "9" * 400, "\u0661\u0665s", "\uff15", "\u00b2",
    "\u00b9:0", "15", "SIGTERM",
    "term", "KILL", "64", "999", "80", "80,443", "65535", "65536", "143:0", "256:0", "1:2,3:4",
    "json", "text", "auto", "JSON", "true", "false", "yes", "off", "none", "GET", "post", "ß",
    "/", "/healthz", "no-slash", "@name", "@", "/tmp/x.sock", "x" * 200,
    "http://127.0.0.1:8080/down", "https://[::1]:8443/down?x=1", "http://h:99999/",
    "http://h:0/", "ftp://h/", "http://", "http://a b/", "http://\udcff/", "http://[::1/",
    "http://" + "a" * 64 + ".com/", "\udcff", "\udc80\udcfe", "\u00e9", "--", "-", "--delay",
]

values = st.one_of(
    st.sampled_from(TRICKY),
    st.text(max_size=12),
    st.text(st.characters(codec="utf-8", exclude_characters="\0") | st.sampled_from(
        ["\udcff", "\udc80"]), max_size=8),
    st.from_regex(r"\A[0-9]{1,4}(\.[0-9]{1,3})?(ms|s|m|h)?\Z"),
)


def table_rows(command: str) -> list[Option]:
    return [row for row in OPTIONS if command in row.commands]


def arguments(row: Option, value: str, equals: bool) -> list[str]:
    if row.kind == "flag":
        return [row.flag]
    return [f"{row.flag}={value}"] if equals else [row.flag, value]


def outcome(raw: dict[str, Any]) -> str:
    try:
        return repr(resolve(raw, environ={}))
    except ConfigError as exc:
        return f"error: {exc}"


@contextmanager
def quiet() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        yield out, err


def via_typer(command: str, args: list[str]) -> str:
    """The typer app's outcome: the Config (or error) of the raw values it hands the command."""
    captured: dict[str, Any] = {}

    def body(raw: dict[str, Any], *_rest: Any) -> int:
        captured["raw"] = raw
        return 0

    with pytest.MonkeyPatch.context() as mp, quiet() as (_out, err):
        mp.setattr(commands, command, body)
        code = app_main([command, *args, *(["--", "/bin/true"] if command == "run" else [])])
    if "raw" not in captured:
        assert code == exitcodes.EXIT_USAGE and err.getvalue().count("\n") == 1
        return "usage"
    return outcome(captured["raw"])


# ---- the fast parser and the typer app agree -------------------------------------------------


@pytest.mark.parametrize("command", ["run", "prestop"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_parser_and_typer_agree_on_every_option(command: str, data: st.DataObject) -> None:
    rows = data.draw(st.lists(st.sampled_from(table_rows(command)), min_size=1, max_size=3))
    args: list[str] = []
    for row in rows:
        args += arguments(row, data.draw(values), data.draw(st.booleans()))
    try:
        raw, rest = fastparse.parse(command, [*args, "--", "/bin/true"])
    except fastparse.NotFast:
        return  # the typer app handles it: nothing to compare (its usage errors are below)
    assert rest == ["/bin/true"]
    assert outcome(raw) == via_typer(command, args)


@pytest.mark.parametrize("command", ["run", "prestop"])
def test_every_option_of_the_table_reaches_both_parsers(command: str) -> None:
    # One good value per option, and each changes the Config the same way in both parsers.
    good = {"delay": "2s", "down_url": "http://127.0.0.1:8080/down", "down_method": "post",
            "down_timeout": "3s", "port": "8080", "drain_timeout": "7s", "settle": "0",
            "poll_interval": "50ms", "grace_period": "1h", "stop_signal": "INT",
            "stop_timeout": "4s", "idle_grace": "2s", "probe_path": "/ready",
            "control_socket": "@x", "termination_log": "", "log_format": "text",
            "exit_code_map": "143:0"}
    default = repr(Config())
    for row in table_rows(command):
        args = arguments(row, good.get(row.name, ""), equals=False)
        raw, _ = fastparse.parse(command, [*args, "--", "/bin/true"])
        fast = outcome(raw)
        assert fast != default and not fast.startswith("error"), row.name
        assert fast == via_typer(command, args), row.name


def test_a_flag_without_its_value_is_a_usage_error_of_the_typer_app() -> None:
    with pytest.raises(fastparse.NotFast):
        fastparse.parse("prestop", ["--delay"])
    assert via_typer("prestop", ["--delay"]) == "usage"
    assert via_typer("prestop", ["--nope", "1"]) == "usage"


# ---- the table ----------------------------------------------------------------------------------


def test_config_defaults_are_the_tables() -> None:
    config = Config()
    for row in OPTIONS:
        if row.default is not None:
            assert getattr(config, row.attr) == row.convert(row.default, row.flag), row.name
    assert config.ports == () and config.exit_code_map == {} and config.single_child is False
    assert config.down_url is None and config.probe_path == "/"
    custom = Config(delay=1.0, ports=(80,), exit_code_map={143: 0})
    assert (custom.delay, custom.ports, dict(custom.exit_code_map)) == (1.0, (80,), {143: 0})
    with pytest.raises(TypeError, match="nope"):
        Config(nope=1)  # type: ignore[call-arg]


def test_flags_beat_variables_and_no_probe_beats_probe_path() -> None:
    env = {"DRAINCTL_DELAY": "7s", "DRAINCTL_PORTS": "80, 443", "DRAINCTL_SINGLE_CHILD": "yes",
           "DRAINCTL_NO_PROBE": "false"}
    config = resolve({"delay": "1s", "port": None, "single_child": False, "no_probe": None,
                      "probe_path": "/x"}, env)
    assert (config.delay, config.ports, config.single_child, config.probe_path) == (
        1.0, (80, 443), True, "/x")
    assert resolve({"probe_path": "/x", "no_probe": True}, {}).probe_path is None
    with pytest.raises(ConfigError, match="DRAINCTL_SINGLE_CHILD"):
        resolve({"single_child": None}, {"DRAINCTL_SINGLE_CHILD": "maybe"})


# ---- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("15s", 15), ("2m", 120), ("1h", 3600), ("1h30m", 5400), ("1.5", 1.5),
    (" 2s ", 2), (".5s", 0.5), ("24h", DAY), ("0", 0),
])
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", "s", "-1s", "nan", "inf", "1e3", "\uff11s", "\u0661\u0665s", "\u00b2", "5 s s", "5sec",
    "1H", "9" * 400,
    "1000h", "24h1ms", "x" * 100,
])
def test_durations_reject_with_one_line(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text, "--delay")
    assert str(info.value).startswith("--delay: ") and "\n" not in str(info.value)


@settings(deadline=None)  # a loaded CI machine: no per-example deadline
@given(st.floats(min_value=0, max_value=DAY))
def test_format_duration_reads_back(seconds: float) -> None:
    text = format_duration(seconds)
    back = parse_duration(text)
    # Rounded to 0.1 ms under a second, 0.1 s under a minute, whole seconds, then minutes.
    tolerance = 0.0001 if seconds < 1 else 0.05 if seconds < 60 else 1 if seconds < 3600 else 60
    assert math.isclose(back, seconds, abs_tol=tolerance + 1e-9), (seconds, text)


@settings(deadline=None)  # a loaded CI machine: no per-example deadline
@given(st.text(max_size=30))
@example("\u0661\u0665s")
@example("\uff15")
def test_any_text_is_a_bounded_duration_or_one_line(text: str) -> None:
    try:
        seconds = parse_duration(text, "--x")
    except DurationError as exc:
        assert "\n" not in str(exc)
    else:
        assert text.isascii() and 0 <= seconds <= DAY


# ---- the down URL -------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/ok.htm?down=true", "https://localhost/down", "http://[::1]:8080/down",
    "HTTP://app:1/", "http://app.default.svc.cluster.local:65535", "http://u:p@h/x#y",
])
def test_down_url_accepted_is_callable_by_httpx(url: str) -> None:
    import httpx

    assert parse_down_url(url) == url
    httpx.URL(url)


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://127.0.0.1/down", "http or https"), ("localhost:8080/down", "not a URL"),
    ("http://", "no valid host"), ("http:///down", "no valid host"),
    ("http://:8080/down", "no valid host"), ("not a url", "printable ASCII"),
    ("http://127.0.0.1:8080/ok .htm", "printable ASCII"), ("http://127.0.0.1:99999/", "1-65535"),
    ("http://127.0.0.1:abc/", "1-65535"), ("http://127.0.0.1:0/", "1-65535"),
    ("http://[::1/", "no valid host"), ("http://\udcff/down", "printable ASCII"),
    ("http://h\u00e9/", "printable ASCII"), ("http://" + "a" * 64 + "/", "no valid host"),
])
def test_down_url_rejected_with_one_line(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        parse_down_url(url, "--down-url")
    assert "\n" not in str(info.value)


@settings(deadline=None)  # a loaded CI machine: no per-example deadline
@given(st.from_regex(r"\A(https?|HTTP|ftp)://[a-z0-9.\[\]:@%-]{0,20}(/[!-~]{0,10})?\Z"))
def test_every_down_url_it_accepts_httpx_accepts(url: str) -> None:
    import httpx

    try:
        parse_down_url(url)
    except ConfigError:
        return
    parsed = httpx.URL(url)
    assert parsed.host and parsed.scheme in ("http", "https")


# ---- any input, every command, in process -------------------------------------------------------

# Each command's options beyond the table (name, takes a value).
EXTRA = {
    "status": [("--json", False)],
    "connections": [("--port", True), ("--json", False), ("--interval", True),
                    ("--watch", False)],
    "demo": [("--clients", True), ("--slow-clients", True), ("--delay", True), ("--json", False)],
    "check": [], "run": [], "prestop": [],
}
# What a command may answer when its input is valid (its work is stubbed or harmless here).
CODES = {"run": {0}, "prestop": {0}, "check": {0}, "demo": {0}, "status": {0, 3},
         "connections": {0, 1}}


def flags_of(command: str) -> list[tuple[str, bool]]:
    table = [(row.flag, row.kind != "flag") for row in table_rows(command)]
    return table + EXTRA[command]


def test_extra_flags_listed_here_are_all_the_app_has() -> None:
    import typer

    from drainctl.cli.app import app

    group = typer.main.get_command(app)  # typer bundles its own click: no isinstance
    assert set(group.commands) == set(EXTRA)  # type: ignore[attr-defined]
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        given_flags = {flag for param in command.params for flag in param.opts
                       if flag.startswith("--")} - {"--help", "--app"}
        assert given_flags == {flag for flag, _ in flags_of(name)}, name


def own_socket() -> str:
    return f"@drainctl-test-{uuid.uuid4().hex[:12]}"


@contextmanager
def stubbed(environ: dict[str, str]) -> Iterator[None]:
    """The environment given, and the commands' work after validation replaced."""
    import drainctl.cli.check
    import drainctl.control.prestop
    import drainctl.demo.scenario
    import drainctl.pid1.supervisor

    class Supervisor:
        def __init__(self, command: Sequence[str], config: Config, events: object,
                     **_services: object) -> None:
            assert isinstance(config, Config)

        def run(self) -> int:
            return 0

    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("DRAINCTL_")]:
            mp.delenv(name)
        for name, value in environ.items():
            mp.setenv(name, value)
        mp.setattr(drainctl.pid1.supervisor, "Supervisor", Supervisor)
        mp.setattr(drainctl.control.prestop, "prestop", lambda config, events: 0)
        mp.setattr(drainctl.cli.check, "check", lambda config, given: 0)
        mp.setattr(drainctl.demo.scenario, "main", lambda options, as_json: 0)
        yield


def assert_value_or_one_line(command: str, code: int, err: str) -> None:
    assert "Traceback" not in err
    if code == exitcodes.EXIT_USAGE:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("drainctl: "), err
    else:
        assert code in CODES[command], (code, err)


@pytest.mark.parametrize("command", sorted(EXTRA))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_input_in_process_is_a_value_or_one_line(command: str, data: st.DataObject) -> None:
    args: list[str] = []
    flags = [each for each in flags_of(command) if each[0] != "--watch"]  # runs until ^C
    for flag, takes_value in data.draw(st.lists(st.sampled_from(flags), max_size=3)):
        value = data.draw(values)
        assume("\0" not in value)  # argv and environ cannot carry NUL
        args += ([f"{flag}={value}"] if data.draw(st.booleans()) else [flag, value]
                 ) if takes_value else [flag]
    environ = {"DRAINCTL_CONTROL_SOCKET": own_socket(), "DRAINCTL_TERMINATION_LOG": ""}
    rows = table_rows(command)
    for row in data.draw(st.lists(st.sampled_from(rows), max_size=2)) if rows else []:
        value = data.draw(values)
        assume("\0" not in value)
        environ[row.env] = value
    argv = [command, *args, *(["--", "/bin/true"] if command == "run" else [])]
    with stubbed(environ), quiet() as (_out, err):
        code = main(argv)
    assert_value_or_one_line(command, code, err.getvalue())


# ---- any bytes, every command, as real processes ------------------------------------------------

raw_bytes = st.one_of(
    st.sampled_from([b"\xff", b"\xc3(", b"5\xffs", b"http://127.0.0.1:8080/\xff",
                     b"@\xfe", b"\xed\xa0\x80", b"1h30m", b"8080"]),
    st.binary(min_size=0, max_size=10).filter(lambda b: b"\0" not in b),
)


def run_real(argv: list[bytes], env: dict[bytes, bytes]) -> tuple[int, str]:
    done = subprocess.run([os.fsencode(a) for a in drainctl_argv()] + argv, env=env,
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    return done.returncode, done.stderr.decode(errors="replace")


@pytest.mark.parametrize("command", sorted(EXTRA))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_bytes_as_a_real_process_are_a_value_or_one_line(
    command: str, data: st.DataObject
) -> None:
    flags = [(flag, value) for flag, value in flags_of(command)
             if flag not in ("--exit-code-map", "--watch")]
    flag, takes_value = data.draw(st.sampled_from(flags))
    value = data.draw(raw_bytes)
    argv = [command.encode(), flag.encode(), *([value] if takes_value else [])]
    if command == "run":
        argv += [b"--", b"/bin/true"]
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()
           if not k.startswith("DRAINCTL_")}
    env[b"PYTHONIOENCODING"] = b"utf-8:strict"  # as under a UTF-8 locale: no surrogateescape
    # Whatever valid value comes, prestop's own drain ends within a second: nothing to wait for.
    env.update({b"DRAINCTL_CONTROL_SOCKET": own_socket().encode(), b"DRAINCTL_DELAY": b"0",
                b"DRAINCTL_GRACE_PERIOD": b"2s", b"DRAINCTL_STOP_TIMEOUT": b"1s",
                b"DRAINCTL_SETTLE": b"0", b"DRAINCTL_TERMINATION_LOG": b"",
                b"DRAINCTL_LOG_FORMAT": b"json", b"DRAINCTL_PORTS": b"1"})
    rows = [row for row in table_rows(command) if row.name != "exit_code_map"]
    if rows:
        env[data.draw(st.sampled_from(rows)).env.encode()] = data.draw(raw_bytes)
    if command == "demo":  # the real demo takes 15 s: keep it to its usage errors
        if flag == "--delay":
            try:
                parse_duration(os.fsdecode(value), maximum=5.0)
            except DurationError:
                pass
            else:
                assume(False)
        else:
            argv += [b"--clients", b"0"]
    code, err = run_real(argv, env)
    # Real work: prestop may find connections left, check may find the budget broken.
    codes = CODES[command] | {"prestop": {exitcodes.EXIT_LEFT},
                              "check": {exitcodes.EXIT_BROKEN}}.get(command, set())
    assert "Traceback" not in err, err
    if code == exitcodes.EXIT_USAGE:
        assert len(err.splitlines()) == 1 and err.startswith("drainctl: "), err
    elif command == "demo":
        pytest.fail(f"the demo ran: {err}")
    else:
        assert code in codes, (code, err)


# ---- the maximum works, for real ----------------------------------------------------------------


def test_the_longest_grace_period_drains_and_stops_on_sigterm(procs: Processes) -> None:
    # 1000h once raised OverflowError at SIGTERM; the maximum must work end to end.
    proc = procs.drainctl("run", "--grace-period", "24h", "--stop-timeout", "23h",
                          "--delay", "0", "--settle", "0", "--port", "1",
                          "--control-socket", own_socket(), "--termination-log", "",
                          "--", "sleep", "30")
    proc.wait_event("child.started")
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == exitcodes.signal_code(signal.SIGTERM)
    finished = proc.wait_event("drain.finished")
    assert finished["reason"] == "drained"
    assert not any(e["event"] == "error" for e in proc.events()), proc.stderr()


def test_past_the_maximum_is_a_usage_error_before_the_app_starts(procs: Processes) -> None:
    proc = procs.drainctl("run", "--grace-period", "1000h", "--", "sleep", "30")
    assert proc.wait(15) == exitcodes.EXIT_USAGE
    assert proc.stderr() == "drainctl: --grace-period: '1000h' is past the maximum of 24h\n"


# ---- start-up: the run path stays lean with a down URL ------------------------------------------


def test_run_with_a_down_url_imports_no_typing_dataclasses_or_urllib() -> None:
    code = (
        "import sys\n"
        "from drainctl.cli import commands, fastparse\n"
        "from drainctl.options import resolve\n"
        "raw, rest = fastparse.parse('run', ['--down-url', 'http://127.0.0.1:8080/down', '--',"
        " '/bin/true'])\n"
        "assert resolve(raw).down_url == 'http://127.0.0.1:8080/down'\n"
        "import drainctl.pid1.supervisor, drainctl.events\n"
        "heavy = ('typing', 'dataclasses', 'urllib.parse', 'inspect', 'httpx', 'typer',\n"
        "         'drainctl.drain.downcall')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    # -S: no site, so a .pth start-up hook of this machine cannot import typing for us.
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, PYTHONPATH=str(ROOT / "supervisor")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# ---- the README holds the tables of the code ----------------------------------------------------


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_options_table_is_the_option_table() -> None:
    assert readme_table() in readme(), "README.md: paste `python3 -m drainctl.options`'s table"
    interface = (ROOT / "docs" / "interface.md").read_text()
    assert readme_table() in interface, "docs/interface.md: paste the same table"


def test_readme_exit_code_table_is_exitcodes() -> None:
    assert exitcodes.markdown() in readme(), "README.md: paste `python3 -m drainctl.exitcodes`"


def test_every_exit_code_constant_is_in_the_table() -> None:
    described = " ".join(code for code, _, _ in exitcodes.TABLE)
    for name in exitcodes.__all__:
        if name.startswith("EXIT_") and name != "EXIT_SIGNAL_BASE":
            assert f"`{getattr(exitcodes, name)}`" in described, name
    assert exitcodes.prestop_code("timeout") == exitcodes.EXIT_LEFT
    assert {exitcodes.prestop_code(r) for r in ("drained", "no-ports", "child-exited",
                                                 "forced")} == {exitcodes.EXIT_OK}


def test_no_command_defines_an_exit_code_of_its_own() -> None:
    # Exit codes come from exitcodes.py: no module in cli/ or control/ assigns EXIT_* itself.
    for path in (ROOT / "supervisor" / "drainctl").rglob("*.py"):
        if path.name == "exitcodes.py":
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not (stripped.startswith("EXIT_") and " = " in stripped), f"{path}: {line}"


def test_help_shows_every_option_and_its_bounds() -> None:
    # --help comes from the table too.
    with quiet() as (out, _err):
        assert app_main(["run", "--help"]) == 0
    text = " ".join(out.getvalue().split())
    for row in table_rows("run"):
        assert row.flag in text
    assert "At most 24h." in text and "At least 10ms, at most 1m." in text


def test_check_reports_a_non_utf8_name_under_a_strict_locale(tmp_path: Path) -> None:
    # The report shows the socket and log paths it was given: bytes that are not UTF-8 are
    # escaped, not a UnicodeEncodeError halfway through the report.
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()
           if not k.startswith("DRAINCTL_")}
    env[b"PYTHONIOENCODING"] = b"utf-8:strict"
    name = os.fsencode(tmp_path) + b"/\xff"
    done = subprocess.run([*map(os.fsencode, drainctl_argv()), b"check", b"--control-socket",
                           name + b".sock", b"--termination-log", name + b".log",
                           b"--grace-period", b"60s"],
                          env=env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert b"Traceback" not in done.stderr, done.stderr
    assert done.returncode in (exitcodes.EXIT_OK, exitcodes.EXIT_BROKEN)
    assert b"\\udcff.sock" in done.stdout and b"\\udcff.log" in done.stdout
