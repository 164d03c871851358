"""Artifact store by URL (a local folder, ``s3://bucket/prefix``, anything fsspec opens).

Artifacts are content-addressed: ``<root>/sha256/<first two hex>/<digest>``. Putting the same bytes
twice stores them once. Every fetch hashes what it reads and refuses bytes whose digest differs from
the one the registry recorded, so a tampered or truncated artifact never reaches a runtime.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

from modelserve.errors import ModelServeError

CHUNK = 1 << 20


class DigestMismatch(ModelServeError):
    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class Artifact:
    uri: str
    digest: str
    size: int


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a local file, read in chunks."""
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


class ArtifactStore:
    def __init__(self, url: str | Path, storage_options: dict | None = None):
        url = str(url)
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.local = "file" in _protocols(self.fs)
        if self.local:
            root = os.path.abspath(os.path.expanduser(root))
            os.makedirs(root, exist_ok=True)
        self.root = root.rstrip("/")
        self.url = url

    def _key(self, digest: str) -> str:
        return f"{self.root}/sha256/{digest[:2]}/{digest}"

    def uri(self, key: str) -> str:
        return self.fs.unstrip_protocol(key)

    def put(self, source: Path) -> Artifact:
        """Store a local file (once per content); return where it is and its digest."""
        digest, size = file_digest(source)
        key = self._key(digest)
        if not (self.fs.exists(key) and self.fs.size(key) == size):
            if self.local:  # write beside, then rename: a reader never sees half a file
                os.makedirs(os.path.dirname(key), exist_ok=True)
                partial = f"{key}.{uuid.uuid4().hex}.partial"
                self.fs.put_file(str(source), partial)
                os.replace(partial, key)
            else:  # an object store's PUT is atomic already
                self.fs.put_file(str(source), key)
        return Artifact(self.uri(key), digest, size)

    def fetch(self, uri: str, digest: str, dest: Path) -> Path:
        """Copy an artifact to ``dest``, hashing on the way; refuse it if the digest differs."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.partial")
        sha = hashlib.sha256()
        try:
            with self._open(uri) as src, open(partial, "wb") as out:
                while chunk := src.read(CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
        except FileNotFoundError:
            partial.unlink(missing_ok=True)
            raise DigestMismatch(f"artifact {uri} is missing from the store") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if sha.hexdigest() != digest:
            partial.unlink(missing_ok=True)
            raise DigestMismatch(f"artifact {uri} has sha256 {sha.hexdigest()[:12]}…, the registry recorded "
                                 f"{digest[:12]}…: refused (tampered or corrupt)")
        os.replace(partial, dest)
        return dest

    def _open(self, uri: str):
        if uri.startswith(self.uri(self.root)) or not _has_protocol(uri):
            return self.fs.open(self.fs._strip_protocol(uri), "rb")
        return fsspec.open(uri, "rb").open()  # recorded under another store: open by its own URL

    def remove(self, uri: str) -> None:
        self.fs.rm_file(self.fs._strip_protocol(uri))


def _protocols(fs) -> tuple:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _has_protocol(uri: str) -> bool:
    return "://" in uri
