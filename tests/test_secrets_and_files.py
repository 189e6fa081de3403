"""Secrets stay out of logs, and the termination log is written only where it is meant to be.

The down URL's password and query values never appear in anything drainctl prints: events of
`drainctl run` (JSON and text), a standalone `prestop`, a `prestop` relaying the supervisor's
events, `drainctl check`, the termination message, the error line of a bad down URL. The app
still gets the real URL (it answers the down call). redact_url's rule is checked on its own with
Hypothesis.

The termination log is appended only to an existing regular file: a symbolic link is not
followed, a FIFO, a directory and a device are refused with one `warning` naming the path and
why; a missing file is silently "off". Real files, a real FIFO, a real character device (mknod,
as root).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drainctl.drain.downcall import redact_url
from drainctl.drain.termination import write
from drainctl.events import Events, format_json, format_text
from drainctl.options import parse_down_url
from tests.conftest import IS_ROOT, Processes, app, drainctl_argv
from tests.hooks import free_port

PASSWORD = "password"
SECRET = "secret"


def secret_url(port: int, path: str = "/ok.htm") -> str:
    return f"http://user:{PASSWORD}@127.0.0.1:{port}{path}?down=true&token={SECRET}"


def own_socket() -> str:
    return f"@drainctl-test-{uuid.uuid4().hex[:12]}"


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and SECRET not in text, text


# ---- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:password@127.0.0.1:8080/ok.htm?down=true&token=secret#frag",
         "http://user:***@127.0.0.1:8080/ok.htm?down=***&token=***"),
        ("https://app.default.svc:8443/down", "https://app.default.svc:8443/down"),
        ("http://[::1]:8080/down?x", "http://[::1]:8080/down?x"),
        ("http://token@app/down", "http://token@app/down"),
        ("http://u:p@ss@app/down", "http://u:***@app/down"),  # the last @ ends the userinfo
        ("http://u:secret@127.0.0.1:99999/", "http://u:***@127.0.0.1:99999/"),  # invalid port
        ("u:secret@app/down", "u:***@app/down"),  # no scheme: a bad URL's error still hides it
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


_PART = st.text(
    alphabet=st.characters(exclude_characters="@/?#&=:", exclude_categories=["Cs"]),
    min_size=1, max_size=20,
)


@given(user=_PART, password=_PART, host=_PART, key=_PART, value=_PART, other=_PART)
def test_redact_url_never_shows_password_or_values(
    user: str, password: str, host: str, key: str, value: str, other: str
) -> None:
    url = f"http://{user}:{password}@{host}/p?{key}={value}&a={other}"
    shown = redact_url(url)
    assert shown == f"http://{user}:***@{host}/p?{key}=***&a=***"
    assert redact_url(shown) == shown


@given(st.text())
def test_redact_url_takes_any_text(text: str) -> None:
    shown = redact_url(text)
    assert isinstance(shown, str) and redact_url(shown) == shown


@pytest.mark.parametrize(
    "url",
    [
        "http://user:password@127.0.0.1:99999/?token=secret",
        "http://user:password@[::1/?token=secret",
        "ftp://user:password@127.0.0.1/?token=secret",
        "http://user:password@127.0.0.1/ ?token=secret",
        "http://user:password@127.0.0.1:0/?token=secret",
    ],
)
def test_bad_down_url_error_hides_the_secrets(url: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_down_url(url)
    assert_clean(str(info.value))
    done = subprocess.run([*drainctl_argv(), "run", "--down-url", url, "--", "true"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.startswith("drainctl: ") and "--down-url" in done.stderr
    assert_clean(done.stdout, done.stderr)


def test_any_url_field_is_redacted_in_both_formats(tmp_path: Path) -> None:
    """Whoever emits a `url` (an older supervisor whose events prestop relays, too)."""
    record = {"ts": 1.0, "event": "down.called", "url": secret_url(8080), "status": 200}
    assert_clean(format_json(record), format_text(record))
    assert "token=***" in format_json(record)
    path = tmp_path / "events"
    with path.open("w") as stream:
        seen: list[dict[str, object]] = []
        events = Events("json", stream)
        events.subscribe(seen.append)
        events.emit("down.called", url=secret_url(8080))
    assert_clean(path.read_text(), repr(seen))


# ---- the real commands ------------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_run_logs_and_termination_log_hide_the_secrets(
    procs: Processes, tmp_path: Path, log_format: str
) -> None:
    log = tmp_path / "termination-log"
    log.write_text("")
    port = free_port()
    sup = procs.drainctl("run", "--control-socket", own_socket(), "--delay", "0.2",
                         "--settle", "0.1", "--termination-log", str(log),
                         "--down-url", secret_url(port),
                         "--", *app("httpapp.py", "--port", str(port)),
                         env={"DRAINCTL_LOG_FORMAT": log_format})
    sup.wait_output("listening")
    sup.signal(signal.SIGTERM)
    assert sup.wait(15) == 128 + signal.SIGTERM
    assert "down 1 " in sup.stdout(), "the app got the real down call"
    assert "down.called" in sup.stderr() and "token=***" in sup.stderr()
    assert "down GET http://user:***@127.0.0.1" in log.read_text()
    assert_clean(sup.stdout(), sup.stderr(), log.read_text())


def test_standalone_prestop_hides_the_secrets(procs: Processes, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    log.write_text("")
    port = free_port()
    web = procs.start(app("httpapp.py", "--port", str(port)))
    web.wait_output("listening")
    hook = procs.drainctl("prestop", "--control-socket", own_socket(), "--port", str(port),
                          "--delay", "0", "--settle", "0.1", "--termination-log", str(log),
                          "--down-url", secret_url(port))
    assert hook.wait(15) == 0, hook.stderr()
    assert "down 1 " in web.stdout()
    assert "down.called" in hook.stderr()
    assert_clean(hook.stdout(), hook.stderr(), log.read_text())


def test_prestop_relaying_the_supervisor_hides_the_secrets(procs: Processes) -> None:
    address = own_socket()
    port = free_port()
    sup = procs.drainctl("run", "--control-socket", address, "--delay", "0.2", "--settle", "0.1",
                         "--down-url", secret_url(port), "--termination-log", "",
                         "--", *app("httpapp.py", "--port", str(port)))
    sup.wait_output("listening")
    hook = procs.drainctl("prestop", "--control-socket", address)
    assert hook.wait(15) == 0, hook.stderr()
    assert "down.called" in hook.stderr(), "the supervisor's events are relayed"
    assert_clean(hook.stdout(), hook.stderr(), sup.stderr())


@pytest.mark.parametrize("listening", [True, False])
def test_check_hides_the_secrets(procs: Processes, listening: bool) -> None:
    port = free_port()
    if listening:
        procs.start(app("httpapp.py", "--port", str(port))).wait_output("listening")
    done = subprocess.run(
        [*drainctl_argv(), "check", "--control-socket", own_socket(), "--port", str(port),
         "--down-url", secret_url(port)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == (0 if listening else 1), done.stdout + done.stderr
    assert f"http://user:***@127.0.0.1:{port}/ok.htm?down=***&token=***" in done.stdout
    assert_clean(done.stdout, done.stderr)


# ---- the termination log: only a regular file ----------------------------------------------------


def test_regular_file_is_appended(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    log.write_text("app said goodbye\n")
    assert write(str(log), "drainctl: drained\n") is None
    assert log.read_text() == "app said goodbye\ndrainctl: drained\n"


def test_missing_file_is_off_and_never_created(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert write(str(missing), "x\n") is None
    assert not missing.exists()


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    link = tmp_path / "termination-log"
    link.symlink_to(target)
    problem = write(str(link), "drainctl: drained\n")
    assert problem is not None and str(link) in problem and "symbolic link" in problem
    assert target.read_text() == "precious\n"


def test_dangling_symlink_creates_nothing(tmp_path: Path) -> None:
    link = tmp_path / "termination-log"
    link.symlink_to(tmp_path / "would-be-created")
    problem = write(str(link), "x\n")
    assert problem is not None and "symbolic link" in problem
    assert not (tmp_path / "would-be-created").exists()


@pytest.mark.parametrize("reader", [False, True])
def test_fifo_neither_blocks_nor_is_written(tmp_path: Path, reader: bool) -> None:
    fifo = tmp_path / "termination-log"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) if reader else None
    try:
        start = time.monotonic()
        problem = write(str(fifo), "drainctl: drained\n")
        assert time.monotonic() - start < 1.0
        assert problem is not None and str(fifo) in problem and "FIFO" in problem
        if fd is not None:
            try:
                data = os.read(fd, 100)
            except BlockingIOError:  # a writer is still there, with nothing written
                data = b""
            assert data == b"", "nothing was written"
    finally:
        if fd is not None:
            os.close(fd)


def test_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "termination-log"
    directory.mkdir()
    problem = write(str(directory), "x\n")
    assert problem is not None and str(directory) in problem and "directory" in problem
    assert list(directory.iterdir()) == []


def test_character_device_is_refused(tmp_path: Path) -> None:
    if not IS_ROOT:
        if os.environ.get("CI"):  # in CI a skip would hide a missing requirement
            pytest.fail("CI: mknod of a character device needs root", pytrace=False)
        pytest.skip("mknod of a character device needs root")
    device = tmp_path / "termination-log"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    problem = write(str(device), "x\n")
    assert problem is not None and str(device) in problem and "character device" in problem


def test_prestop_warns_once_about_a_symlinked_termination_log(
    procs: Processes, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "termination-log"
    link.symlink_to(target)
    port = free_port()
    web = procs.start(app("httpapp.py", "--port", str(port)))
    web.wait_output("listening")
    hook = procs.drainctl("prestop", "--control-socket", own_socket(), "--port", str(port),
                          "--delay", "0", "--settle", "0.1", "--termination-log", str(link))
    assert hook.wait(15) == 0, hook.stderr()
    warnings = [e for e in hook.events() if e["event"] == "warning"]
    assert len(warnings) == 1
    assert str(link) in warnings[0]["message"] and "symbolic link" in warnings[0]["message"]
    assert target.read_text() == ""


def test_check_says_a_fifo_is_no_termination_log(tmp_path: Path) -> None:
    fifo = tmp_path / "termination-log"
    os.mkfifo(fifo)
    done = subprocess.run(
        [*drainctl_argv(), "check", "--control-socket", own_socket(), "--port", "1",
         "--termination-log", str(fifo)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("termination log:"))
    assert str(fifo) in line and "FIFO" in line
