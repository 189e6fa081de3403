"""The one rule for showing the down URL: its password and query values never leave drainctl.

The down URL may carry a secret (`http://user:password@app/down?token=...`), and everything
drainctl prints ends up somewhere it should not: container logs, `kubectl describe pod` (the
termination message), Kubernetes events (a failed preStop hook's output). So every place that
shows the URL shows `redact_url(url)` instead (README, "Log events"):

- scheme, user name, host, port and path are kept (they say which endpoint was called);
- the password becomes `***` (`http://user:***@app:8080/down`);
- each query value becomes `***`, its key stays (`/ok.htm?down=***&token=***`); a key without a
  value stays as it is;
- the fragment (never sent) is dropped.

Plain string work, no urllib: it must never raise (it also shows URLs that failed validation)
and costs nothing at PID 1's start-up.
"""

from __future__ import annotations

__all__ = ["MASK", "redact_url"]

MASK = "***"


def redact_url(url: str) -> str:
    """`url` with its password and query values replaced by `***` (see the module docstring)."""
    if not isinstance(url, str):
        return MASK
    rest, _, _fragment = url.partition("#")
    rest, has_query, query = rest.partition("?")
    # The authority: after "//" (or from the start, for a URL without a scheme, which only
    # an error message shows) up to the next "/".
    start = rest.find("//")
    start = 0 if start == -1 else start + 2
    end = rest.find("/", start)
    end = len(rest) if end == -1 else end
    userinfo, at, hostport = rest[start:end].rpartition("@")
    if at:
        user, has_password, _password = userinfo.partition(":")
        authority = user + (":" + MASK if has_password else "") + "@" + hostport
        rest = rest[:start] + authority + rest[end:]
    if not has_query:
        return rest
    items = []
    for item in query.split("&"):
        key, has_value, _value = item.partition("=")
        items.append(key + ("=" + MASK if has_value else ""))
    return rest + "?" + "&".join(items)
