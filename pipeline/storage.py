"""Local paths and bucket URLs behind one small API, so every command reads and writes both.

A location is a local path or an fsspec URL: `s3://` (s3fs; MinIO, R2 and Ceph through
AWS_ENDPOINT_URL or storage options), `gs://` (gcsfs), `az://` / `abfs://` (adlfs) and, read-only,
`http(s)://`. Credentials come from each library's standard chain (AWS variables, profiles and
roles; Google ADC; Azure identity); `--storage-options JSON` (exported as BARLOW_STORAGE_OPTIONS, so
DataLoader workers and the server see it too) passes anything else, such as an endpoint.

Object stores have no rename, so `output()` writes a local temp file and publishes it with one PUT
when the block succeeds: an object is absent or complete, never torn, as with `files.atomic_output`
on a disk. Errors of the stores (no bucket, no credentials, access denied) become one sentence.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import UserError
from pipeline.files import atomic_output

OPTIONS_ENV = "BARLOW_STORAGE_OPTIONS"
CACHE_ENV = "BARLOW_CACHE_DIR"  # where bucket folders are downloaded for libraries that need paths
READ_ONLY = ("http", "https")
EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}  # pip extra per scheme


def scheme(location: str | Path) -> str:
    """`s3` for s3://b/k, '' for a local path (a one-letter scheme is a Windows drive, `file` is local)."""
    name = urlparse(str(location)).scheme if "://" in str(location) else ""
    return "" if len(name) <= 1 or name == "file" else name


def is_url(location: str | Path) -> bool:
    return bool(scheme(location))


def local_path(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://")).expanduser()


def set_options(text: str | None) -> None:
    """`--storage-options '{"endpoint_url": ...}'`: checked, then exported for child processes."""
    if not text:
        return
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--storage-options must be a JSON object, e.g. '{{\"endpoint_url\": \"http://minio:9000\"}}' "
                        f"({exc})") from None
    if not isinstance(value, dict):
        raise UserError("--storage-options must be a JSON object of keyword arguments for the storage library")
    os.environ[OPTIONS_ENV] = json.dumps(value)


def options(protocol: str) -> dict[str, Any]:
    """Storage options for one scheme: BARLOW_STORAGE_OPTIONS, either flat or keyed by scheme."""
    text = os.environ.get(OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise UserError(f"{OPTIONS_ENV} must be a JSON object, not {text[:60]!r}") from None
    if isinstance(value, dict) and isinstance(value.get(protocol), dict):
        return dict(value[protocol])
    return {k: v for k, v in value.items() if not isinstance(v, dict)} if isinstance(value, dict) else {}


_filesystems: dict[tuple[int, str, str], Any] = {}


def filesystem(location: str | Path):
    """(fsspec filesystem, path inside it). One instance per process and scheme: a forked DataLoader
    worker makes its own, since a client's event loop and connections do not survive a fork."""
    import fsspec

    protocol = scheme(location) or "file"
    text = str(location) if protocol != "file" else str(local_path(location))
    key = (os.getpid(), protocol, os.environ.get(OPTIONS_ENV, ""))
    try:
        if key not in _filesystems:
            # Listings are not cached: a re-run or a long-lived process must see objects others wrote.
            defaults = {} if protocol == "file" else {"use_listings_cache": False}
            _filesystems[key] = fsspec.filesystem(protocol, skip_instance_cache=True,
                                                  **{**defaults, **options(protocol)})
    except (ImportError, ValueError) as exc:
        extra = EXTRAS.get(protocol)
        hint = f"; install it with pip install 'barlow-embed[{extra}]'" if extra else ""
        raise UserError(f"cannot open {protocol}:// locations ({exc}){hint}") from None
    fs = _filesystems[key]
    return fs, fs._strip_protocol(text)


def join(base: str | Path, *names: str) -> str:
    """`base/name/...` for paths and URLs alike."""
    text = str(base).rstrip("/") if is_url(base) else str(local_path(base))
    for name in names:
        text = f"{text}/{name.strip('/')}" if is_url(base) else str(Path(text) / name)
    return text


def name_of(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def describe(exc: BaseException, location: str | Path) -> str:
    """One sentence for what a store said about `location`."""
    name = type(exc).__name__
    text = (str(exc).splitlines() or [""])[0][:200]
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "ClientAuthenticationError") \
            or "credentials" in text.lower() and "invalid" not in text.lower():
        return (f"no credentials to read {location}: set the cloud's standard variables (for S3 AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or a workload role) ({text})")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text \
            or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"access denied to {location}: the credentials in use may not read or write it ({text})"
    if isinstance(exc, FileNotFoundError):
        if "bucket" in text.lower():
            return f"the bucket of {location} does not exist ({text})"
        return f"{location} does not exist"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot access {location}: {exc.strerror}"
    return f"cannot access {location}: {name}: {text}"


@contextmanager
def errors_as_sentences(location: str | Path) -> Iterator[None]:
    """Turn a store's exception inside the block into one UserError sentence about `location`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # boto, google and azure clients raise their own classes, not OSError
        raise UserError(describe(exc, location)) from None


def exists(location: str | Path) -> bool:
    fs, path = filesystem(location)
    with errors_as_sentences(location):
        return bool(fs.exists(path))


def is_dir(location: str | Path) -> bool:
    fs, path = filesystem(location)
    with errors_as_sentences(location):
        return bool(fs.isdir(path))


def is_file(location: str | Path) -> bool:
    fs, path = filesystem(location)
    with errors_as_sentences(location):
        return bool(fs.isfile(path))


def read_bytes(location: str | Path) -> bytes:
    if not is_url(location):
        try:
            return local_path(location).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {location}: {exc.strerror or exc}") from None
    fs, path = filesystem(location)
    with errors_as_sentences(location):
        return fs.cat_file(path)


def read_text(location: str | Path) -> str:
    try:
        return read_bytes(location).decode()
    except UnicodeDecodeError:
        raise UserError(f"{location} is not UTF-8 text") from None


def url_of(fs, path: str, like: str | Path) -> str:
    """The location of `path` (as fs lists it) in the form of `like` (URL with scheme, or local path)."""
    return f"{scheme(like)}://{path}" if is_url(like) else path


def list_files(location: str | Path) -> dict[str, dict[str, Any]]:
    """Every file below `location`, recursively: location -> its listing entry (size, ETag, mtime...)."""
    fs, path = filesystem(location)
    with errors_as_sentences(location):
        if not fs.exists(path):
            raise FileNotFoundError(path)
        found = fs.find(path, detail=True)
    return {url_of(fs, name, location): info for name, info in sorted(found.items()) if info.get("type") != "directory"}


def info(location: str | Path) -> dict[str, Any]:
    fs, path = filesystem(location)
    with errors_as_sentences(location):
        return fs.info(path)


def identity(entry: dict[str, Any]) -> str | None:
    """What changes when an object's bytes change, from its listing entry: ETag, GCS generation or MD5,
    else size + mtime (local files); None when the store tells neither."""
    size = entry.get("size", entry.get("Size"))
    for field in ("ETag", "etag", "generation", "md5Hash", "content_md5"):
        value = entry.get(field)
        if value:
            return f"{field.lower()}:{str(value).strip(chr(34))}:{size}"
    mtime = entry.get("mtime", entry.get("LastModified", entry.get("last_modified", entry.get("updated"))))
    if size is not None and mtime is not None:
        return f"size:{size}:mtime:{mtime.timestamp() if hasattr(mtime, 'timestamp') else mtime}"
    return None


def remove(location: str | Path) -> None:
    fs, path = filesystem(location)
    with errors_as_sentences(location):
        if fs.exists(path):
            fs.rm_file(path)


def make_dirs(location: str | Path) -> None:
    """A local folder is created; buckets have no folders (a missing bucket shows on the first write)."""
    if not is_url(location):
        local_path(location).mkdir(parents=True, exist_ok=True)


def check_writable(location: str | Path) -> None:
    if scheme(location) in READ_ONLY:
        raise UserError(f"{location} is read-only (http); write to a local folder or a bucket (s3://, gs://, az://)")


@contextmanager
def output(location: str | Path) -> Iterator[Path]:
    """Yield a local temp path; when the block succeeds, publish it at `location` whole.

    Local: `files.atomic_output` (fsync, rename). A URL: one upload of the finished file, so readers
    see no object or the complete one; on failure nothing is uploaded.
    """
    if not is_url(location):
        with atomic_output(local_path(location)) as temp:
            yield temp
        return
    check_writable(location)
    with tempfile.TemporaryDirectory(prefix="barlow-upload-") as folder:
        temp = Path(folder) / name_of(location)
        yield temp
        upload(temp, location)


def upload(local: Path, location: str | Path) -> None:
    fs, path = filesystem(location)
    with errors_as_sentences(location):
        fs.put_file(str(local), path)


def write_bytes(location: str | Path, data: bytes) -> None:
    with output(location) as temp:
        temp.write_bytes(data)


def write_json(location: str | Path, data: Any, indent: int = 1) -> None:
    write_bytes(location, (json.dumps(data, indent=indent) + "\n").encode())


def local_copy(location: str | Path, names: tuple[str, ...] | None = None) -> Path:
    """A local folder holding the files `names` (default: all files) of folder `location`.

    A local folder is returned as it is. A URL is downloaded into $BARLOW_CACHE_DIR (default: the
    temp folder), one cache folder per URL, for libraries that open paths (ONNX Runtime, faiss). Files
    land beside the cache folder, are checked, then renamed into it, so processes starting together
    never read a half-downloaded file; a named file that is missing is one sentence saying why.
    """
    if not is_url(location):
        return local_path(location)
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "barlow-cache")
    cache = root / hashlib.sha256(str(location).rstrip("/").encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    download = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    fs, path = filesystem(location)
    base = path.rstrip("/")
    try:
        with errors_as_sentences(location):
            if names is None:
                found = [p for p, i in fs.find(base, detail=True).items() if i.get("type") != "directory"]
                if not found:
                    raise FileNotFoundError(base)
                names = tuple(p[len(base) + 1:] for p in found)
        for name in names:
            target = download / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with errors_as_sentences(join(location, name)):
                fs.get_file(f"{base}/{name}", str(target))
        for name in names:
            if not (download / name).is_file():
                raise UserError(f"{join(location, name)} does not exist")
            (cache / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(download / name, cache / name)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return cache


def publish_folder(local: Path, location: str | Path, last: tuple[str, ...] = ()) -> None:
    """Copy the files of local folder `local` to folder `location`, the names in `last` after all others
    (the file that says the rest is complete, such as index.json, goes last)."""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for file in files:
        target = join(location, *file.relative_to(local).parts)
        if is_url(location):
            upload(file, target)
        else:
            with atomic_output(local_path(target)) as temp:
                shutil.copyfile(file, temp)
