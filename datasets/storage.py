"""Local paths and `s3://` URIs behind one interface: listing, globbing, fingerprints, atomic
output.

fsspec does the listing and byte access (s3fs for S3, with credentials from the standard AWS
chain); `arrow_filesystem` gives Ray Data a pyarrow S3 filesystem for the training reads and
`ray_filesystem` Ray Train its storage. All three resolve S3 in `s3_access`, and none ever
takes credentials from the config.
"""

import hashlib
import os
import posixpath
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec

from stoker.atomic import atomic_directory
from stoker.datasets.config import S3Config
from stoker.errors import UserError

_GLOB_CHARS = set("*?[")


def is_s3(path: str | Path) -> bool:
    return str(path).startswith("s3://")


def endpoint_url(s3: S3Config | None) -> str | None:
    if s3 is not None and s3.endpoint_url:
        return s3.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class S3Access:
    """Where and as whom every S3 filesystem built here reaches S3 (`s3_access`)."""

    endpoint: str | None
    """The S3 endpoint URL (the config's, else AWS_ENDPOINT_URL[_S3]); None for AWS's own."""
    region: str | None
    """The region (the config's; carried: else the AWS chain's)."""
    key: str | None = None
    """The access key, only where the credentials are carried (else the client finds them)."""
    secret: str | None = None
    """The secret key, beside `key`."""
    token: str | None = None
    """The session token, beside `key` (None for long-lived keys)."""


def s3_access(s3: S3Config | None, carry_credentials: bool = False) -> S3Access:
    """The endpoint and region for `s3`. With `carry_credentials`, the AWS chain's credentials
    (and region) are resolved here, on the driver, so a filesystem pickled to Ray workers
    carries them: the workers may have started before this process had them. Never from the
    config."""
    endpoint = endpoint_url(s3)
    region = (s3.region if s3 is not None else None) or None
    if not carry_credentials:
        return S3Access(endpoint, region)
    import botocore.session

    session = botocore.session.get_session()
    region = region or session.get_config_variable("region")
    if (credentials := session.get_credentials()) is None:
        return S3Access(endpoint, region)
    frozen = credentials.get_frozen_credentials()
    return S3Access(endpoint, region, frozen.access_key, frozen.secret_key, frozen.token)


def filesystem(path: str | Path, s3: S3Config | None = None,
               carry_credentials: bool = False) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `path`; S3 credentials come from the AWS chain (resolved
    here with `carry_credentials`, see `s3_access`; else by s3fs where it runs)."""
    if not is_s3(path):
        return fsspec.filesystem("file")
    access = s3_access(s3, carry_credentials)
    options: dict = {}
    client: dict = {}
    if access.endpoint:
        client["endpoint_url"] = access.endpoint
    if access.region:
        client["region_name"] = access.region
    if client:
        options["client_kwargs"] = client
    if access.key is not None:
        options.update(key=access.key, secret=access.secret, token=access.token)
    # No listings cache: a prepare that replaces an output must see its own deletes.
    return fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True, **options)


def strip_scheme(path: str | Path) -> str:
    text = str(path)
    return text[len("s3://"):] if is_s3(text) else str(Path(text).resolve())


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping the `s3://` scheme when `base` has one."""
    return posixpath.join(base, *parts) if is_s3(base) else str(Path(base, *parts))


@dataclass(frozen=True)
class SourceFile:
    """One input file: its URI (as the user would write it), and its size."""

    uri: str
    relative: str
    size: int


def list_sources(sources: list[str], s3: S3Config | None, key: str = "data.source") -> list[SourceFile]:
    """Expand files, directories and globs (local or S3) into a sorted list of data files."""
    found: list[SourceFile] = []
    for source in sources:
        fs = filesystem(source, s3)
        bare = strip_scheme(source) if is_s3(source) else str(source)
        prefix = "s3://" if is_s3(source) else ""
        with storage_errors(key, source):
            if _GLOB_CHARS & set(bare):
                matches = sorted(fs.glob(bare))
                base = bare.split("*")[0].rsplit("/", 1)[0]
                files = [m for m in matches if fs.isfile(m)]
                if not files:
                    raise UserError(f"{key}: {source}: the pattern matches no files")
            else:
                # info() first: for an S3 object it is one HEAD request; a listing is only
                # sent for what is not an object (a prefix, a directory).
                try:
                    kind = fs.info(bare)["type"]
                except FileNotFoundError:
                    raise UserError(f"{key}: {source}: no such file or directory") from None
                if kind == "directory":
                    base = bare.rstrip("/")
                    files = sorted(
                        f for f in fs.find(bare)
                        if not posixpath.basename(f).startswith((".", "_"))
                    )
                    if not files:
                        raise UserError(f"{key}: {source}: directory has no data files")
                else:
                    base, files = posixpath.dirname(bare.rstrip("/")), [bare]
            for name in files:
                size = int(fs.size(name) or 0)
                relative = posixpath.relpath(name, base) if base else posixpath.basename(name)
                found.append(SourceFile(prefix + name, relative, size))
    return found


@contextmanager
def storage_errors(key: str, path: str | Path, pass_missing: bool = False) -> Iterator[None]:
    """Turn what a store raises (unknown bucket, refused credentials, unreachable endpoint, a
    local OS error) into one `UserError` line naming `key` and `path`. A `UserError` raised
    inside passes through; so does FileNotFoundError with `pass_missing`, for a caller that
    says what a missing file means."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        if pass_missing:
            raise
        raise UserError(f"{key}: {path}: no such file, directory or bucket") from None
    except PermissionError as exc:
        raise UserError(f"{key}: {path}: access denied ({_first_line(exc)}); check the AWS credentials") from None
    except (OSError, ValueError) as exc:
        # Unknown bucket, bad endpoint, wrong credentials: s3fs raises OSError subclasses.
        raise UserError(f"{key}: {path}: cannot read: {_first_line(exc)}") from None
    except Exception as exc:  # botocore's own errors (no credentials, bad signature)
        if type(exc).__module__.startswith(("botocore", "aiobotocore")):
            raise UserError(f"{key}: {path}: cannot read: {_first_line(exc)}") from None
        raise


def s3_options(config: dict | None) -> S3Config:
    """The `data.s3` options of a run config as read back from a run or export directory's
    config.yaml (a plain dict), for reading what that run read."""
    return S3Config.model_validate(((config or {}).get("data") or {}).get("s3") or {})


def bare_path(path: str | Path) -> str:
    """`path` as its filesystem (`filesystem(path)`) names it: `bucket/key` for S3."""
    return strip_scheme(path) if is_s3(path) else str(path)


@contextmanager
def open_uri(path: str | Path, s3: S3Config | None = None, mode: str = "rb", key: str = "path"):
    """Open a local path or an `s3://` URI (with the config's `data.s3` options; credentials
    from the AWS chain). Every failure is one `UserError` naming `key` and `path`; a missing
    file is "no such file"."""
    with storage_errors(key, path):
        fs = filesystem(path, s3)
        try:
            handle = fs.open(bare_path(path), mode)
        except FileNotFoundError:
            raise UserError(f"{key}: {path}: no such file or directory") from None
        with handle:
            yield handle


def exists(path: str | Path, s3: S3Config | None = None, key: str = "path") -> bool:
    """Whether a local path or `s3://` URI exists (a bucket that does not is a `UserError`)."""
    with storage_errors(key, path):
        return filesystem(path, s3).exists(bare_path(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def fingerprint(files: list[SourceFile], s3: S3Config | None, stop: threading.Event | None = None) -> str:
    """A content hash of every input file: relative names and bytes (local), or relative names,
    sizes and ETags (S3, where the ETag is the store's own content hash: no second download).
    `stop` set: give up (an empty string) before the next file or megabyte, so that a failed
    preparation does not wait for the hash of a large source before it exits."""
    digest = hashlib.sha256()
    for item in files:
        if stop is not None and stop.is_set():
            return ""
        digest.update(item.relative.encode() + b"\0")
        if is_s3(item.uri):
            fs = filesystem(item.uri, s3)
            info = fs.info(strip_scheme(item.uri))
            digest.update(f"{item.size}:{info.get('ETag', '')}".encode())
            continue
        with open(item.uri, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                if stop is not None and stop.is_set():
                    return ""
                digest.update(block)
    return "sha256:" + digest.hexdigest()


class Staging:
    """A place to write a prepared dataset before it becomes visible at its output."""

    def __init__(self, root: str, fs: fsspec.AbstractFileSystem, local: bool) -> None:
        self.root = root  # a local directory, or `bucket/prefix` without the scheme
        self.fs = fs
        self.local = local

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def open(self, relative: str, mode: str = "wb"):
        path = self.path(relative)
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open(path, mode)


@contextmanager
def atomic_output(target: str, s3: S3Config | None = None, manifest_name: str = "manifest.json") -> Iterator[Staging]:
    """Yield a staging area; on success its contents replace `target`, on error they vanish.

    Local: a sibling temporary directory, swapped in with renames. S3 has no rename, so the
    manifest is the commit marker: files are staged under `<target>.tmp-<id>/`, and on success
    the old manifest is deleted first (the old dataset stops being a dataset), the old objects
    are removed, the staged objects are copied server-side, and the new manifest is written
    last. A write that fails half way leaves nothing at `target`, and readers never see a
    manifest that lists files not yet there.
    """
    if not is_s3(target):
        with atomic_directory(Path(target).resolve()) as staging:
            yield Staging(str(staging), fsspec.filesystem("file"), local=True)
        return
    fs = filesystem(target, s3)
    bare = strip_scheme(target).rstrip("/")
    staged = f"{bare}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield Staging(staged, fs, local=False)
        manifest = posixpath.join(bare, manifest_name)
        if fs.exists(manifest):
            fs.rm(manifest)
        if fs.exists(bare):
            fs.rm(bare, recursive=True)
        staged_files = [f for f in fs.find(staged) if posixpath.basename(f) != manifest_name]
        for name in staged_files:
            fs.copy(name, posixpath.join(bare, posixpath.relpath(name, staged)))
        fs.copy(posixpath.join(staged, manifest_name), manifest)
    finally:
        try:
            fs.rm(staged, recursive=True)
        except FileNotFoundError:
            pass


def read_text(path: str, s3: S3Config | None = None) -> str:
    """The text of a local file or `s3://` object; a missing one raises FileNotFoundError."""
    fs = filesystem(path, s3)
    with fs.open(bare_path(path), "r") as handle:
        return handle.read()


def arrow_filesystem(path: str, s3: S3Config | None = None):
    """A pyarrow filesystem for Ray Data reads of `path` (None for local paths), carrying the
    driver's credentials (`s3_access`)."""
    if not is_s3(path):
        return None
    from pyarrow import fs as pafs

    access = s3_access(s3, carry_credentials=True)
    kwargs: dict = {}
    if access.key is not None:
        kwargs.update(access_key=access.key, secret_key=access.secret, session_token=access.token)
    if access.region:
        kwargs["region"] = access.region
    if url := access.endpoint:
        scheme, _, rest = url.partition("://")
        kwargs.update(endpoint_override=rest or url, scheme=scheme if rest else "https")
    return pafs.S3FileSystem(**kwargs)


def ray_filesystem(path: str, s3: S3Config | None = None):
    """s3fs behind pyarrow's filesystem interface, carrying the driver's credentials
    (`s3_access`), for Ray Train's storage (None for local paths). (pyarrow's own
    S3FileSystem, which works for Ray Data reads, failed Ray Train's first write, the empty
    storage marker, against an S3-compatible server; s3fs writes a small object with one PUT.)"""
    if not is_s3(path):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(filesystem(path, s3, carry_credentials=True)))


@contextmanager
def scratch(target: str, s3: S3Config | None = None) -> Iterator[Staging]:
    """A temporary area next to `target` (so on shared storage when the output is, for Ray
    tasks on other nodes), removed afterwards whatever happens."""
    if not is_s3(target):
        path = Path(target).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        directory = path.parent / f".{path.name}.spill-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        try:
            yield Staging(str(directory), fsspec.filesystem("file"), local=True)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    fs = filesystem(target, s3)
    root = f"{strip_scheme(target).rstrip('/')}.spill-{uuid.uuid4().hex[:8]}"
    try:
        yield Staging(root, fs, local=False)
    finally:
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass
