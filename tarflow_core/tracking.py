"""Checks on an MLflow tracking URI that fail in seconds, before MLflow retries for minutes."""

import socket
import urllib.parse
from pathlib import Path

from tarflow_core.errors import TarflowError


def check_reachable(uri: str, hint: str, timeout: float = 5.0) -> None:
    """Refuse an http(s) tracking server that does not answer a TCP connection in `timeout`."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise TarflowError(
            f"MLflow tracking server {uri!r} cannot be reached: {error}", hint=hint
        ) from None


def check_existing_store(uri: str, hint: str) -> None:
    """For commands that only read: refuse a store that is not there, rather than let MLflow
    (or SQLAlchemy) create an empty one at a mistyped path. Servers are checked for an answer."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:" and not Path(path).is_file():
            raise TarflowError(f"no database at {path!r} (from {uri!r})", hint=hint)
        return
    if parsed.scheme in ("http", "https"):
        check_reachable(uri, hint)
        return
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # a path, or a drive letter
        raise TarflowError(
            f"{uri!r} is a file store; tarflow tracks to a database or a server",
            hint="give the store's URI, e.g. sqlite:///mlflow.db",
        )
