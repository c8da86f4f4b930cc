"""Where shared files live: a local path or a URI (``s3://bucket/prefix``, ``gs://...``, ``abfs://...``), resolved
once into a pyarrow filesystem and a path on it. Everything a cluster shares (prepared shards, run folders,
checkpoints, the progress file) goes through ``Location``; code above this module never builds a local ``Path``
from a shared location, and this is the only module that looks at a URI's scheme.

S3 settings come from the standard AWS variables (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION`` or ``AWS_REGION``),
or from pyarrow's own query options in the URI (``s3://bucket/prefix?endpoint_override=host:port&scheme=http``).
Other schemes are whatever ``pyarrow.fs.FileSystem.from_uri`` supports in the installed pyarrow.

Writes are whole-or-nothing: on a local disk a temp name then a rename, on an object store a single put (an
object appears only once its upload completed).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_LOCK = threading.Lock()


class StorageError(ValueError):
    """A storage problem the user can fix (bucket, credentials, endpoint, scheme): one line naming the URI."""


@dataclass(frozen=True, eq=False)
class Location:
    """A file or folder on some filesystem: ``fs`` + ``path`` (the filesystem's own path, no scheme).

    Behaves like a small ``pathlib.Path``: ``/``, ``name``, ``parent``; ``str()`` gives the URI (or the local
    path). A local location equals the ``Path`` of the same file."""

    fs: pafs.FileSystem = field(repr=False)
    path: str
    scheme: str = ""  # "" for the local disk

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local disk")
        return Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path.rstrip("/")), self.scheme)

    def __truediv__(self, name: str | os.PathLike) -> Location:
        return Location(self.fs, posixpath.join(self.path, str(name)), self.scheme)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Location):
            return (self.scheme, self.path.rstrip("/")) == (other.scheme, other.path.rstrip("/"))
        if isinstance(other, Path) and self.is_local:
            return Path(self.path) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.scheme, self.path.rstrip("/")))


Where = str | os.PathLike | Location


def native(where: Where) -> Path | Location:
    """A local ``Path`` for a location on the local disk (what local code and tests expect), else the ``Location``."""
    where = location(where)
    return where.local_path if where.is_local else where


# ---------------------------------------------------------------------------------------------- resolving


def is_remote(where: str | os.PathLike | Location) -> bool:
    """Whether ``where`` names an object store or other non-local filesystem (a URI with a scheme)."""
    if isinstance(where, Location):
        return not where.is_local
    return _scheme(str(where)) not in ("", "file")


def location(where: str | os.PathLike | Location) -> Location:
    """``where`` resolved: a local path (made absolute), ``file://``, or a URI of a filesystem pyarrow has."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    scheme = _scheme(text)
    if scheme == "":
        return Location(_local(), str(Path(text).expanduser().resolve()))
    if scheme == "file":
        return Location(_local(), str(Path(urlsplit(text).path).resolve()))
    split = urlsplit(text)
    path = (split.netloc + split.path).rstrip("/") or split.netloc
    if not split.netloc:
        raise StorageError(f"{text}: no bucket or container in the URI (expected {scheme}://BUCKET/PREFIX)")
    return Location(_filesystem(scheme, text), path, scheme)


def _scheme(text: str) -> str:
    match = _URI.match(text)
    return match.group(1).lower() if match else ""


def _local() -> pafs.FileSystem:
    with _LOCK:
        return _FILESYSTEMS.setdefault(("local",), pafs.LocalFileSystem())


def s3_settings() -> dict:
    """The S3 client settings from the standard AWS environment variables (absent ones are left to pyarrow)."""
    env = os.environ
    settings: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        split = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        settings["endpoint_override"] = split.netloc
        settings["scheme"] = split.scheme or "https"
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        settings["access_key"] = env["AWS_ACCESS_KEY_ID"]
        settings["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            settings["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
    if region:
        settings["region"] = region
    return settings


STORAGE_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def storage_environment() -> dict[str, str]:
    """The storage variables this process has: what a job hands its Ray workers, so that a worker on any node
    reaches the same bucket with the same settings without a cluster-wide environment."""
    return {k: os.environ[k] for k in STORAGE_VARIABLES if os.environ.get(k)}


def adopt_environment(variables: dict[str, str] | None) -> None:
    """A worker's side of ``storage_environment``."""
    for key, value in (variables or {}).items():
        if key in STORAGE_VARIABLES:
            os.environ[key] = value


def _filesystem(scheme: str, uri: str) -> pafs.FileSystem:
    if scheme in ("s3", "s3a") and "?" not in uri:
        settings = s3_settings()
        key = ("s3", tuple(sorted(settings.items())))
        with _LOCK:
            if key not in _FILESYSTEMS:
                # a short connect timeout: an endpoint that does not answer is reported in seconds, not minutes
                _FILESYSTEMS[key] = pafs.S3FileSystem(connect_timeout=5, **settings)
            return _FILESYSTEMS[key]
    try:
        fs, _ = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:
        raise StorageError(
            f"{uri}: no filesystem for '{scheme}://' in this pyarrow ({_first_line(error)}); use a local path, "
            "s3:// (tested), or a scheme pyarrow supports (gs://, abfs://, hdfs://)"
        ) from None
    return fs


def describe_endpoint(where: Location) -> str:
    """Where an S3 location's requests go (for messages)."""
    settings = s3_settings()
    if "endpoint_override" in settings:
        return f"{settings['scheme']}://{settings['endpoint_override']}"
    return "AWS S3 (no AWS_ENDPOINT_URL set)"


# --------------------------------------------------------------------------------------------- errors


# fragments of the errors pyarrow's S3 client raises, lower-cased
_REFUSED = (
    "invalidaccesskeyid",
    "invalid_access_key_id",
    "signaturedoesnotmatch",
    "accessdenied",
    "access_denied",
    "forbidden",
    "http status 403",
    "response code: 403",
)
_UNANSWERED = (
    "couldn't connect",
    "could not connect",
    "failed to connect",
    "connection refused",
    "curlcode: 6",
    "curlcode: 7",
    "curlcode: 28",
    "timed out",
    "timeout",
    "resolve host",
    "network_connection",
)


def explain(where: Location | str, error: BaseException) -> str | None:
    """One line saying what a user must fix when ``error`` (raised by the filesystem) is a configuration problem:
    a missing bucket, refused credentials, an endpoint that does not answer. None for anything else."""
    text = str(error)
    lowered = text.lower()
    uri = str(where)
    bucket = urlsplit(uri).netloc if is_remote(uri) else ""
    endpoint = describe_endpoint(where) if isinstance(where, Location) and where.scheme.startswith("s3") else ""
    at = f" at {endpoint}" if endpoint else ""
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "no_such_bucket" in lowered:
        return f"{uri}: no bucket '{bucket}'{at}; create it (or fix the bucket name in the URI)"
    if any(s in lowered for s in _REFUSED):
        return (
            f"{uri}: the storage refused the credentials{at}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to a "
            "key allowed to read and write this bucket"
        )
    if any(s in lowered for s in _UNANSWERED):
        return f"{uri}: the storage endpoint{at} does not answer; check AWS_ENDPOINT_URL (and that the server is up)"
    return None


def check_reachable(where: str | os.PathLike | Location, create: bool = False) -> Location:
    """Resolves ``where`` and proves the storage answers with these settings, before any work starts: the bucket
    exists and the credentials are accepted. ``create`` makes a missing local folder (never a bucket)."""
    loc = location(where)
    try:
        if loc.is_local:
            if create:
                loc.fs.create_dir(loc.path, recursive=True)
            return loc
        bucket = loc.path.split("/", 1)[0]
        info = loc.fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            at = describe_endpoint(loc)
            raise StorageError(f"{loc.uri}: no bucket '{bucket}' at {at}; create it or fix the bucket name in the URI")
        loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True, recursive=False))
    except StorageError:
        raise
    except OSError as error:
        message = explain(loc, error)
        if message:
            raise StorageError(message) from None
        raise
    return loc


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --------------------------------------------------------------------------------------------- reading


def info(where: Where) -> pafs.FileInfo:
    where = location(where)
    return where.fs.get_file_info(where.path)


def exists(where: Where) -> bool:
    where = location(where)
    return info(where).type != pafs.FileType.NotFound


def is_file(where: Where) -> bool:
    where = location(where)
    return info(where).type == pafs.FileType.File


def is_dir(where: Where) -> bool:
    """A folder; on an object store, a prefix with at least one object under it."""
    where = location(where)
    kind = info(where).type
    if kind == pafs.FileType.Directory:
        return True
    if kind == pafs.FileType.NotFound and not where.is_local:
        return bool(where.fs.get_file_info(pafs.FileSelector(where.path, allow_not_found=True)))
    return False


def size(where: Where) -> int:
    where = location(where)
    found = info(where)
    if found.type != pafs.FileType.File:
        raise FileNotFoundError(f"{where}: no such file")
    return found.size


def mtime(where: Where) -> float:
    where = location(where)
    found = info(where).mtime
    return found.timestamp() if found is not None else 0.0


def read_bytes(where: Where) -> bytes:
    where = location(where)
    try:
        with where.fs.open_input_stream(where.path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None


def read_text(where: Where) -> str:
    where = location(where)
    return read_bytes(where).decode("utf-8")


def open_input(where: Where):
    """A seekable binary file (pyarrow ``RandomAccessFile``): Parquet footers are read without the whole file."""
    where = location(where)
    return where.fs.open_input_file(where.path)


def children(where: Where, folders_only: bool = False) -> list[Location]:
    """The files and folders directly in ``where`` (none when it does not exist), sorted by name."""
    where = location(where)
    infos = where.fs.get_file_info(pafs.FileSelector(where.path, allow_not_found=True, recursive=False))
    if folders_only:
        infos = [i for i in infos if i.type == pafs.FileType.Directory]
    return sorted((Location(where.fs, i.path, where.scheme) for i in infos), key=lambda c: c.path)


def newest_mtime(where: Where) -> float:
    """When anything under a folder was last written (object stores keep no folder times), else the file's own."""
    where = location(where)
    found = info(where)
    if found.type == pafs.FileType.File or where.is_local:
        return found.mtime.timestamp() if found.mtime is not None else 0.0
    infos = where.fs.get_file_info(pafs.FileSelector(where.path, allow_not_found=True, recursive=True))
    return max((i.mtime.timestamp() for i in infos if i.mtime is not None), default=0.0)


def walk_files(where: Where) -> dict[str, int]:
    """Every file under ``where``: relative POSIX name -> size in bytes."""
    where = location(where)
    infos = where.fs.get_file_info(pafs.FileSelector(where.path, allow_not_found=True, recursive=True))
    root = where.path.rstrip("/") + "/"
    return {i.path[len(root) :]: i.size for i in infos if i.type == pafs.FileType.File and i.path.startswith(root)}


def sha256(where: Where, chunk: int = 8 << 20) -> str:
    where = location(where)
    digest = hashlib.sha256()
    with where.fs.open_input_stream(where.path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- writing


def makedirs(where: Where) -> None:
    """A folder (and its parents) on a local disk; nothing on an object store, where folders are prefixes."""
    where = location(where)
    if where.is_local:
        where.fs.create_dir(where.path, recursive=True)


def write_bytes(where: Where, data: bytes) -> Location:
    """Readers see the old file or the whole new one, never a part of it."""
    where = location(where)
    if where.is_local:
        target = Path(where.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return where
    with where.fs.open_output_stream(where.path) as f:  # one object, visible once the upload completed
        f.write(data)
    return where


def write_text(where: Where, text: str) -> Location:
    where = location(where)
    return write_bytes(where, text.encode("utf-8"))


def delete(where: Where) -> None:
    """Removes a file or a whole folder; a missing one is not an error."""
    where = location(where)
    kind = info(where).type
    if kind == pafs.FileType.File:
        where.fs.delete_file(where.path)
    elif kind == pafs.FileType.Directory or (kind == pafs.FileType.NotFound and is_dir(where)):
        where.fs.delete_dir(where.path)


def upload_dir(source: str | os.PathLike, target: Where) -> None:
    """Copies a local folder's files under ``target`` (on a local disk, a plain copy)."""
    target = location(target)
    if target.is_local:
        shutil.copytree(source, target.path, dirs_exist_ok=True)
        return
    pafs.copy_files(str(source), target.path, source_filesystem=_local(), destination_filesystem=target.fs)


def download_dir(source: Where, target: str | os.PathLike) -> Path:
    """``source``'s files copied into the local folder ``target`` (created); returns ``target``."""
    source, target = location(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in walk_files(source):
        out = target / name
        out.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            posixpath.join(source.path, name), str(out), source_filesystem=source.fs, destination_filesystem=_local()
        )
    return target


@contextmanager
def local_folder(where: Where) -> Iterator[Path]:
    """A folder as local files for the duration of the block: a local one as it is, one in object storage copied
    into a temp folder (removed afterwards). For readers that only take paths (DeepSpeed, safetensors)."""
    where = location(where)
    if where.is_local:
        yield Path(where.path)
        return
    with tempfile.TemporaryDirectory(prefix="faceforge-fetch-") as tmp:
        yield download_dir(where, Path(tmp) / where.name)


# ----------------------------------------------------------------------------------- tracking-store URIs


def sqlite_database(uri: str) -> Path | None:
    """The database file of an MLflow ``sqlite:///PATH`` store URI, else None (a server, Postgres, ...)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def absolute_sqlite_uri(uri: str) -> str:
    """A relative ``sqlite:///path`` made absolute (every process then opens the same file); others unchanged."""
    database = sqlite_database(uri)
    if database is None or uri.startswith("sqlite:////"):
        return uri
    return f"sqlite:///{database.resolve()}"


def is_http(uri: str) -> bool:
    """An MLflow tracking server reached over HTTP(S)."""
    return _scheme(uri) in ("http", "https")
