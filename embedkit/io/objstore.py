"""OUT on object storage: an `s3://bucket/prefix` output, through the part of pathlib.Path that
OUT's small files use.

Lance reads and writes the datasets under an s3:// OUT itself (its commits are conditional puts,
safe for several writers). The other files (the manifest, the ledger's shard records, the lock,
the index's files) go through `ObjectPath`: an object is written whole by one PUT, so a reader
sees the old object or the new one (what a rename gives on a local disk); the lock is created
with a conditional put (`If-None-Match: *`) and taken over with `If-Match`, so two hosts can
never both hold it.

Credentials, region and endpoint come from the standard AWS environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`; `AWS_ALLOW_HTTP`
lets Lance talk to a plain-http endpoint such as a local test server), read by boto3 and by
Lance alike.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from ..errors import EmbedkitError

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")


def is_uri(path: Any) -> bool:
    """Whether `path` names object storage (scheme://...) rather than a local path."""
    return isinstance(path, ObjectPath) or bool(_URI.match(os.fspath(path) if not isinstance(path, str) else path))


def out_path(out: Any, role: str = "OUT") -> Any:
    """OUT as a local Path, or as an ObjectPath for s3:// (other schemes refused in one line)."""
    if isinstance(out, ObjectPath):
        return out
    text = out if isinstance(out, str) else os.fspath(out)
    m = _URI.match(text)
    if not m:
        return Path(text)
    scheme, rest = m.group(1).lower(), m.group(2).strip("/")
    if scheme != "s3":
        raise EmbedkitError(f"{role} {scheme}://{rest}: only s3:// object storage is supported (and S3-compatible stores "
                            "through AWS_ENDPOINT_URL); give an s3:// URI or a local path")  # fmt: skip
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise EmbedkitError(f"{role} s3://{rest}: the URI names no bucket; give s3://BUCKET/PREFIX")
    return ObjectPath(bucket, key.strip("/"))


@lru_cache(maxsize=None)
def _client() -> Any:
    try:
        import boto3
    except ImportError:
        raise EmbedkitError("an s3:// OUT needs boto3: pip install 'embedkit[s3]'") from None
    # AWS_ENDPOINT_URL is read by boto3 itself (a local or S3-compatible server)
    return boto3.client("s3")


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _missing(e: Exception) -> bool:
    return _code(e) in ("NoSuchKey", "404", "NotFound")


def storage_error(e: Exception, what: str) -> EmbedkitError:
    """One line for a failed object-storage call (credentials, bucket, endpoint)."""
    code = _code(e) or type(e).__name__
    message = str(getattr(e, "response", {}).get("Error", {}).get("Message", "")) or str(e).splitlines()[0]
    return EmbedkitError(f"{what}: {code}: {message[:200]}")


@dataclass(frozen=True)
class Stat:
    st_size: int


@dataclass(frozen=True)
class ObjectPath:
    """`s3://bucket/key`: the pathlib.Path methods OUT's files need, on objects.

    A "folder" is a key prefix: it exists when an object lies under it, and `mkdir` is a no-op.
    Not os.PathLike on purpose: a local `open()` of an object path fails instead of writing a
    folder named "s3:".
    """

    bucket: str
    key: str

    def __truediv__(self, name: str | os.PathLike) -> "ObjectPath":
        name = os.fspath(name).strip("/")
        return ObjectPath(self.bucket, f"{self.key}/{name}" if self.key else name)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def with_suffix(self, suffix: str) -> "ObjectPath":
        stem = self.name.rsplit(".", 1)[0] if "." in self.name else self.name
        return self.parent / (stem + suffix)

    # ---- reading ---------------------------------------------------------------------------

    def _head(self) -> dict | None:
        try:
            return _client().head_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if _missing(e):
                return None
            raise storage_error(e, f"cannot read {self}") from None

    def is_file(self) -> bool:
        return bool(self.key) and self._head() is not None

    def is_dir(self) -> bool:
        try:
            got = _client().list_objects_v2(Bucket=self.bucket, Prefix=self._prefix(), MaxKeys=1)
        except Exception as e:
            raise storage_error(e, f"cannot list {self}") from None
        return got.get("KeyCount", 0) > 0

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> Stat:
        head = self._head()
        if head is None:
            raise FileNotFoundError(str(self))
        return Stat(int(head["ContentLength"]))

    def etag(self) -> str | None:
        head = self._head()
        return None if head is None else str(head["ETag"])

    def read_bytes(self) -> bytes:
        return self.read_with_etag()[0]

    def read_with_etag(self) -> tuple[bytes, str]:
        try:
            got = _client().get_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if _missing(e):
                raise FileNotFoundError(str(self)) from None
            raise storage_error(e, f"cannot read {self}") from None
        return got["Body"].read(), str(got["ETag"])

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def _prefix(self) -> str:
        return f"{self.key}/" if self.key else ""

    def _keys(self, recursive: bool) -> Iterator[str]:
        """Keys (recursive) or immediate child names under this prefix."""
        pages = _client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._prefix(), **({} if recursive else {"Delimiter": "/"}))
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"]
                for common in page.get("CommonPrefixes", []):
                    yield common["Prefix"].rstrip("/")
        except Exception as e:
            raise storage_error(e, f"cannot list {self}") from None

    def sizes(self) -> dict[str, int]:
        """Path relative to this prefix -> bytes, of every object under it (one paginated listing)."""
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._prefix())
        try:
            return {obj["Key"][len(self._prefix()):]: int(obj["Size"]) for page in pages for obj in page.get("Contents", [])}
        except Exception as e:
            raise storage_error(e, f"cannot list {self}") from None

    def iterdir(self) -> Iterator["ObjectPath"]:
        for key in self._keys(recursive=False):
            yield ObjectPath(self.bucket, key)

    def listdir(self) -> list[str]:
        return [p.name for p in self.iterdir()]

    # ---- writing ---------------------------------------------------------------------------

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object lies under it."""

    def write_bytes(self, data: bytes, **conditions: str) -> str:
        """One PUT: the object is replaced whole (readers see the old bytes or the new ones).
        Returns the new ETag."""
        try:
            return str(_client().put_object(Bucket=self.bucket, Key=self.key, Body=data, **conditions)["ETag"])
        except Exception as e:
            if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise FileExistsError(str(self)) from None
            raise storage_error(e, f"cannot write {self}") from None

    def write_text(self, text: str) -> str:
        return self.write_bytes(text.encode())

    def create_exclusive(self, data: bytes) -> str | None:
        """Create the object only if it does not exist (a conditional put): its ETag, or None
        when another writer's object is there."""
        try:
            return self.write_bytes(data, IfNoneMatch="*")
        except FileExistsError:
            return None

    def replace_if(self, data: bytes, etag: str) -> str | None:
        """Replace the object only if it is still the version `etag` (a conditional put): the
        new ETag, or None when it changed meanwhile (someone else wrote it first)."""
        try:
            return self.write_bytes(data, IfMatch=etag)
        except FileExistsError:
            return None

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and self._head() is None:
            raise FileNotFoundError(str(self))
        try:
            _client().delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            raise storage_error(e, f"cannot delete {self}") from None

    def rmtree(self) -> None:
        """Delete every object under this prefix (and the object of this name)."""
        keys = list(self._keys(recursive=True))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                _client().delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as e:
                raise storage_error(e, f"cannot delete {self}") from None
        if self.key and self._head() is not None:
            self.unlink(missing_ok=True)

    def upload(self, local: Path) -> None:
        try:
            _client().upload_file(str(local), self.bucket, self.key)
        except Exception as e:
            raise storage_error(e, f"cannot upload {local} to {self}") from None

    def download(self, local: Path) -> None:
        """Into `local` atomically (a temporary name beside it, then renamed)."""
        tmp = local.with_name(f".{local.name}.download")
        try:
            _client().download_file(self.bucket, self.key, str(tmp))
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if _missing(e):
                raise FileNotFoundError(str(self)) from None
            raise storage_error(e, f"cannot download {self}") from None
        os.replace(tmp, local)


# ---- helpers taking either kind of path --------------------------------------------------------


def remove_tree(path: Any) -> None:
    """shutil.rmtree(ignore_errors=True) for a local folder; every object under an s3:// prefix."""
    if isinstance(path, ObjectPath):
        path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def listdir(path: Any) -> list[str]:
    """Names in a folder (or under a prefix); [] when there is none."""
    if isinstance(path, ObjectPath):
        return path.listdir()
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def local_cache(path: Any, what: str) -> Path:
    """The local folder standing for an object-storage folder (the index is built and searched
    from local files): under $EMBEDKIT_CACHE, else ~/.cache/embedkit, named after the URI; not
    created here."""
    import hashlib

    root = Path(os.environ.get("EMBEDKIT_CACHE") or Path.home() / ".cache" / "embedkit")
    return root / what / hashlib.sha256(str(path).encode()).hexdigest()[:16]


# ---- the lock ------------------------------------------------------------------------------------

LEASE_S = 60.0  # a lock whose holder has not renewed it for this long is taken over
RENEW_S = 15.0


class ObjectLock:
    """OUT's lock as an object, for writers on several hosts.

    Taken with a conditional put that succeeds only if no lock object exists. The holder renews
    it every RENEW_S seconds (a conditional put on its own last version); a lock not renewed for
    LEASE_S seconds (its host was preempted), or held by a process of this host that is gone
    (kill -9), is taken over with a conditional put on the version that was read: of two hosts
    taking over at once, one wins. Released by deleting it, if it is still this holder's.
    """

    def __init__(self, path: ObjectPath, holder: str):
        self.path, self.holder = path, holder
        self._etag: str | None = None
        self._stop: Any = None
        self._thread: Any = None

    def _record(self) -> bytes:
        import json
        import socket
        import time

        return json.dumps({"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()}).encode()

    def acquire(self) -> None:
        etag = self.path.create_exclusive(self._record())
        if etag is None:
            try:
                data, current = self.path.read_with_etag()
            except FileNotFoundError:  # released in between: try once more
                data, current = b"", ""
            if current and not _abandoned(data):
                raise EmbedkitError(f"{self.path.parent} is in use by another embedkit run ({_holder(data)}); wait for it or stop it")
            etag = self.path.replace_if(self._record(), current) if current else self.path.create_exclusive(self._record())
            if etag is None:
                raise EmbedkitError(f"{self.path.parent} was just taken by another embedkit run; wait for it or stop it")
        self._etag = etag
        self._start_renewing()

    def _start_renewing(self) -> None:
        import threading

        self._stop = threading.Event()

        def renew() -> None:
            while not self._stop.wait(RENEW_S):
                etag = self.path.replace_if(self._record(), self._etag or "")
                if etag is None:  # taken over: this run stalled past the lease
                    return
                self._etag = etag

        self._thread = threading.Thread(target=renew, name="embedkit-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        try:
            data, etag = self.path.read_with_etag()
        except (FileNotFoundError, EmbedkitError):
            return
        if etag == self._etag:
            self.path.unlink(missing_ok=True)


def _parse(data: bytes) -> dict:
    import json

    try:
        doc = json.loads(data.decode() or "{}")
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}


def _holder(data: bytes) -> str:
    return str(_parse(data).get("holder", "another process"))


def _abandoned(data: bytes) -> bool:
    """A lock record whose holder is gone: not renewed within the lease, or a dead process of this host."""
    import socket
    import time

    doc = _parse(data)
    if time.time() - float(doc.get("renewed", 0)) > LEASE_S:
        return True
    if doc.get("host") == socket.gethostname():
        try:
            os.kill(int(doc.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


def lock_held_by(path: ObjectPath, holder: str) -> bool:
    """Whether the lock object is held now, within its lease, by `holder`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    return _parse(data).get("holder") == holder and not _abandoned(data)
