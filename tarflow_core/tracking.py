"""Checks on an MLflow tracking URI that fail in seconds, before MLflow retries for minutes."""

import socket
import tempfile
import urllib.parse
from pathlib import Path

from tarflow_core.errors import TarflowError


def check_reachable(uri: str, hint: str, timeout: float = 5.0) -> None:
    """Refuse an http(s) tracking server that does not answer a TCP connection in `timeout`,
    and a SQLite store that cannot be opened for writing (MLflow would retry for minutes)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        check_writable_sqlite(uri, hint)
        return
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
    refuse_file_store(uri)


def refuse_file_store(uri: str) -> None:
    """MLflow 3 keeps file stores (a folder of runs) only behind a flag; tarflow takes a
    database or a server."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # a path, or a drive letter
        raise TarflowError(
            f"{uri!r} is a file store; tarflow tracks to a database or a server",
            hint="give the store's URI, e.g. sqlite:///mlflow.db",
        )


def check_writable_sqlite(uri: str, hint: str) -> None:
    """Refuse a SQLite file that cannot be written, or created where its folder stands. The
    folder is tried with a real file: permission bits say nothing to root, and nothing of a
    read-only mount."""
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise TarflowError(f"MLflow store {uri!r}: no folder {str(folder)!r}", hint=hint)
    try:
        if target.exists():
            with open(target, "r+b"):
                pass
        # SQLite writes a journal beside the database, so the folder must take files too.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise TarflowError(
            f"MLflow store {uri!r} cannot be written: {error.strerror or error}", hint=hint
        ) from None
