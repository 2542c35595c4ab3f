"""Fetching the public data releases: download (resumable, checksummed), layout check, unpacking.

``python -m reckoning_ray.data fetch`` calls these; stdlib only (urllib, hashlib, zipfile) and tqdm
for the progress bar.

Nothing is ever half-installed in the target directory DIR:

- a download grows in ``<DIR>.<archive name>.partial`` beside DIR; a cut connection keeps it, and
  the next run continues it with an HTTP ``Range`` request (a server that ignores the range sends
  the whole file again);
- the sha256 is checked on the whole file; a mismatch deletes the partial file (it cannot be
  resumed) and installs nothing;
- the wanted members are unpacked into a temporary directory beside DIR, which is renamed to DIR
  only once every file is written (``staging``).

Every failure raises ``FetchError`` (an ``InputError``: the command exits with status 2), whose
message names the URL or file it tried and how to go on, e.g. with ``--archive FILE`` offline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Mapping, Optional

from tqdm import tqdm

from reckoning_ray.core.errors import InputError

PROOFWRITER_ARCHIVE = "proofwriter-dataset-V2020.12.3.zip"
PROOFWRITER_URL = "https://aristo-data-public.s3.amazonaws.com/proofwriter/" + PROOFWRITER_ARCHIVE
PROOFWRITER_SHA256 = "bbc5694901e8306d0bd659aa1ad53ccfd02c201864f4b320ffa3777827d1fc26"
PROOFWRITER_ROOT = "proofwriter-dataset-V2020.12.3"
# The open-world depth-D sets: the paper's "D-hop" ProofWriter data (PAPER.md).
PROOFWRITER_DEPTHS = (0, 1, 2, 3, 5)
PROOFWRITER_FILES = ("meta-train.jsonl", "meta-dev.jsonl", "meta-test.jsonl")
_PROOFWRITER_MEMBER = re.compile(
    rf"^{re.escape(PROOFWRITER_ROOT)}/OWA/(depth-\d+)/(meta-(?:train|dev|test)\.jsonl)$")

# CLUTRR-SG (Gontier et al. 2020): the Google-Drive zip of NicolasAG/SGinPG data/setup.sh.
CLUTRR_SG_DRIVE_ID = "1TUXEcyR5i3TCrYtlTIX65swQH56TSiJj"
CLUTRR_SG_URL = f"https://drive.usercontent.google.com/download?id={CLUTRR_SG_DRIVE_ID}&export=download&confirm=t"
CLUTRR_SG_PAGE = f"https://drive.google.com/file/d/{CLUTRR_SG_DRIVE_ID}/view"
CLUTRR_SG_ARCHIVE = "clutrr.zip"
# The train / valid files end in .txt.4000, the test files (test/{k}/) in .txt; case varies (ANON).
CLUTRR_SG_PATTERN = "{no,short,long}_proof_1.{k}_{train,valid,test}_facts_anon.txt[.4000]"
_CLUTRR_SG_FILE = re.compile(r"^(?:no|short|long)_proof_1\.\d+_(?:train|valid|test)_facts_anon\.txt(?:\.4000)?$",
                             re.IGNORECASE)

DEFAULT_TIMEOUT = 10.0
_CHUNK = 1 << 20


class FetchError(InputError):
    """A download, checksum, archive layout or target directory problem (exit status 2)."""


@dataclasses.dataclass
class Fetched:
    """What a fetch left in ``directory``: its files (sorted) and the archive's sha256 (None when
    nothing was downloaded or unpacked because ``directory`` was complete already)."""

    directory: Path
    files: list[Path]
    sha256: Optional[str] = None
    already: bool = False


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def partial_path(dest: Path, archive_name: str) -> Path:
    """Where a download into ``dest`` grows until it is whole: beside ``dest``."""
    return dest.parent / f"{dest.name}.{archive_name}.partial"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def probe(url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Raise OSError when no HTTP server answers at ``url`` within ``timeout`` seconds (any HTTP
    answer, an error status included, counts as an answer)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        raise OSError(_reason(exc)) from None


def download(url: str, partial: Path, *, timeout: float = DEFAULT_TIMEOUT, progress: bool = True,
             offline_hint: str = "", desc: str = "download") -> None:
    """Download ``url`` into ``partial``, continuing what a cut earlier run left there.

    Raises FetchError when the server cannot be reached (naming ``url``, followed by
    ``offline_hint``), answers with an error status, or the connection is cut (the part stays
    in ``partial`` for the next run).
    """
    have = partial.stat().st_size if partial.is_file() else 0
    headers = {"User-Agent": "reckoning-ray-fetch/1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return  # the part is the whole file already: the checksum decides
        raise FetchError(f"cannot download {url}: HTTP {exc.code} {exc.reason}. {offline_hint}".rstrip()) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        raise FetchError(f"cannot download {url} ({_reason(exc)}). {offline_hint}".rstrip()) from None
    with response:
        resumed = bool(have) and response.status == 206
        if resumed:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != have:
                partial.unlink(missing_ok=True)
                raise FetchError(f"{url} answered the resume request (Range: bytes={have}-) with "
                                 f"Content-Range {response.headers.get('Content-Range')!r}; the partial file "
                                 f"was deleted: run the command again to download from the start")
        else:
            have = 0
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        total = have + expected if expected is not None else None
        received, cut = 0, None
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
            desc=desc, leave=False,
        ) as bar:
            try:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                cut = _reason(exc)
            except KeyboardInterrupt:
                cut = "interrupted"
    if cut is not None or (expected is not None and received < expected):
        size = partial.stat().st_size
        of = f" of {total:,}" if total is not None else ""
        raise FetchError(f"the download of {url} was cut after {size:,}{of} bytes ({cut or 'connection closed'}); "
                         f"the part is kept in {partial}: run the same command again to continue it")


def check_sha256(path: Path, expected: Optional[str], what: str) -> str:
    """The sha256 of ``path``; FetchError when ``expected`` is given and differs."""
    actual = sha256_of(path)
    if expected and actual != expected.strip().lower():
        raise FetchError(f"sha256 of {what} is {actual}, expected {expected.strip().lower()}: the file is "
                         f"corrupt or another release; nothing was installed. Pass --sha256 {actual} only if "
                         f"you trust this file")
    return actual


def _safe_relative(name: str) -> Optional[PurePosixPath]:
    """``name`` (a zip member) as a relative path, or None when it would leave the target."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def proofwriter_members(archive: zipfile.ZipFile) -> dict[str, str]:
    """{member: path under DIR} for the OWA ``depth-D/meta-*.jsonl`` files of the ProofWriter
    release; FetchError naming what is missing when the zip lacks the release's layout."""
    found = {}
    for name in archive.namelist():
        match = _PROOFWRITER_MEMBER.match(name)
        if match:
            found[name] = f"{match.group(1)}/{match.group(2)}"
    wanted = [f"depth-{d}/{f}" for d in PROOFWRITER_DEPTHS for f in PROOFWRITER_FILES]
    missing = [w for w in wanted if w not in found.values()]
    if missing:
        tops = sorted({n.split("/")[0] for n in archive.namelist()})[:5]
        raise FetchError(
            f"{archive.filename} is not the ProofWriter release: expected "
            f"{PROOFWRITER_ROOT}/OWA/depth-{{0,1,2,3,5}}/meta-{{train,dev,test}}.jsonl; missing "
            f"{len(missing)} of {len(wanted)}, e.g. {PROOFWRITER_ROOT}/OWA/{missing[0]} (the zip's top level: {tops})")
    return found


def clutrr_sg_members(archive: zipfile.ZipFile) -> dict[str, str]:
    """{member: path under DIR} for CLUTRR-SG's ``{no,short,long}_proof_1.{k}_{train,valid,test}
    _facts_anon.txt[.4000]`` files, found at any depth; their directories in the zip are kept (the
    release has the same names under ``forward/`` and ``backward/``)."""
    found = {}
    for name in archive.namelist():
        rel = _safe_relative(name)
        if rel is not None and not name.endswith("/") and _CLUTRR_SG_FILE.match(rel.name):
            found[name] = str(rel)
    if not found:
        files = [n for n in archive.namelist() if not n.endswith("/")]
        shown = ", ".join(files[:8]) + (f", ... ({len(files)} files)" if len(files) > 8 else "")
        raise FetchError(f"{archive.filename} holds no CLUTRR-SG file named like {CLUTRR_SG_PATTERN}; "
                         f"found: {shown or 'no files'}")
    return found


def all_members(archive: zipfile.ZipFile) -> dict[str, str]:
    """{member: path under DIR} for every file of the zip (members that would leave DIR skipped)."""
    out = {}
    for name in archive.namelist():
        rel = _safe_relative(name)
        if rel is not None and not name.endswith("/"):
            out[name] = str(rel)
    return out


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def staging(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``dest``, renamed to ``dest`` when the block ends without an
    exception (and deleted when it raises). An existing ``dest`` must be empty unless
    ``overwrite``, in which case it is replaced."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists() and not _is_empty_dir(dest):
            if not overwrite or not dest.is_dir():
                raise FetchError(f"{dest} is not empty: choose another --to or pass --overwrite")
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unpack(archive: zipfile.ZipFile, members: Mapping[str, str], dest: Path, overwrite: bool = False,
           check: Optional[Callable[[Path], None]] = None) -> list[Path]:
    """Write ``members`` ({member: relative path}) of ``archive`` under ``dest`` (``staging``);
    ``check(tmp)``, when given, raises FetchError before anything is moved into place."""
    with staging(dest, overwrite) as tmp:
        for member, rel in members.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
                raise FetchError(f"cannot unpack {member} from {archive.filename}: {_reason(exc)}") from None
        if check is not None:
            check(tmp)
    return sorted(dest / rel for rel in members.values())


def _files_under(dest: Path) -> list[Path]:
    return sorted(p for p in dest.rglob("*") if p.is_file())


def _prepare(dest: str | os.PathLike, overwrite: bool, complete: Callable[[Path], bool]) -> tuple[Path, Optional[Fetched]]:
    """The absolute target directory, and a Fetched when it holds a complete set already."""
    path = Path(os.path.expanduser(str(dest))).absolute()
    if path.exists() and not path.is_dir():
        raise FetchError(f"--to {path} is a file: give a directory")
    if path.is_dir() and not _is_empty_dir(path) and not overwrite:
        if complete(path):
            return path, Fetched(path, _files_under(path), already=True)
        raise FetchError(f"--to {path} is not empty and holds no complete set: choose another directory "
                         f"or pass --overwrite")
    return path, None


def _open_zip(path: Path, what: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{what} is not a readable zip archive ({_reason(exc)})") from None


def fetch_archive(dest: str | os.PathLike, *, url: Optional[str], archive: Optional[str | os.PathLike],
                  archive_name: str, sha256: Optional[str], select: Callable[[zipfile.ZipFile], dict[str, str]],
                  complete: Callable[[Path], bool], offline_hint: str, overwrite: bool = False,
                  timeout: float = DEFAULT_TIMEOUT, progress: bool = True) -> Fetched:
    """Download ``url`` (or take ``archive``, a local copy), check ``sha256`` when given, and
    unpack the members ``select`` picks into ``dest``."""
    path, done = _prepare(dest, overwrite, complete)
    if done is not None:
        return done
    partial = None
    if archive is not None:
        source = Path(os.path.expanduser(str(archive))).absolute()
        if not source.is_file():
            raise FetchError(f"--archive {source} does not exist (or is not a file)")
        what = str(source)
    else:
        if not url:
            raise FetchError(f"no URL to download from. {offline_hint}".strip())
        partial = source = partial_path(path, archive_name)
        download(url, partial, timeout=timeout, progress=progress, offline_hint=offline_hint, desc=archive_name)
        what = f"the download of {url} ({partial})"
    try:
        digest = check_sha256(source, sha256, what)
        if partial is not None and not zipfile.is_zipfile(source):
            raise FetchError(f"{url} sent no zip archive (a web page instead?); nothing was installed. {offline_hint}")
        with _open_zip(source, what) as zf:
            files = unpack(zf, select(zf), path, overwrite)
    except FetchError:
        # A whole download that is not the archive cannot be continued: start afresh next time.
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    if partial is not None:
        partial.unlink(missing_ok=True)
    return Fetched(path, files, digest)


def proofwriter_complete(path: Path) -> bool:
    return all((path / f"depth-{d}" / f).is_file() for d in PROOFWRITER_DEPTHS for f in PROOFWRITER_FILES)


def fetch_proofwriter(dest: str | os.PathLike, *, url: str = PROOFWRITER_URL, archive: Optional[str | os.PathLike] = None,
                      sha256: Optional[str] = PROOFWRITER_SHA256, overwrite: bool = False,
                      timeout: float = DEFAULT_TIMEOUT, progress: bool = True) -> Fetched:
    """The ProofWriter release's OWA ``depth-{0,1,2,3,5}/meta-{train,dev,test}.jsonl`` in
    ``dest/depth-D/``: each depth directory is a ``data.path`` of the ProofWriter reader."""
    hint = (f"Without network: download {PROOFWRITER_ARCHIVE} where there is network (from {PROOFWRITER_URL} "
            f"or a mirror; a mirror here with --url URL), copy it here and pass --archive FILE")
    return fetch_archive(dest, url=url, archive=archive, archive_name=PROOFWRITER_ARCHIVE, sha256=sha256,
                         select=proofwriter_members, complete=proofwriter_complete, offline_hint=hint,
                         overwrite=overwrite, timeout=timeout, progress=progress)


def clutrr_sg_complete(path: Path) -> bool:
    return any(_CLUTRR_SG_FILE.match(p.name) for p in _files_under(path))


def fetch_clutrr_sg(dest: str | os.PathLike, *, url: Optional[str] = CLUTRR_SG_URL,
                    archive: Optional[str | os.PathLike] = None, sha256: Optional[str] = None,
                    overwrite: bool = False, timeout: float = DEFAULT_TIMEOUT, progress: bool = True) -> Fetched:
    """CLUTRR-SG's ``{no,short,long}_proof_1.{k}_{train,valid,test}_facts_anon.txt[.4000]`` files in
    ``dest``, under the directories they have in the zip. The release is a Google-Drive file: a
    download may get a sign-in or quota page instead of the zip, so ``archive`` (the zip fetched
    in a browser) is the usual way; no checksum is published (``sha256`` checks one if given)."""
    hint = (f"Download {CLUTRR_SG_ARCHIVE} in a browser from {CLUTRR_SG_PAGE} (NicolasAG/SGinPG data/setup.sh), "
            f"copy it here and pass --archive FILE")
    return fetch_archive(dest, url=url, archive=archive, archive_name=CLUTRR_SG_ARCHIVE, sha256=sha256,
                         select=clutrr_sg_members, complete=clutrr_sg_complete, offline_hint=hint,
                         overwrite=overwrite, timeout=timeout, progress=progress)


def install_copy(source: str | os.PathLike, dest: str | os.PathLike, *, complete: Callable[[Path], bool],
                 check: Callable[[Path], None], overwrite: bool = False) -> Fetched:
    """Copy a directory, or unpack a zip, that a user fetched by hand into ``dest`` (``staging``);
    ``check(tmp)`` raises FetchError when the copy lacks the expected files."""
    path, done = _prepare(dest, overwrite, complete)
    if done is not None:
        return done
    src = Path(os.path.expanduser(str(source))).absolute()
    if src.is_dir():
        with staging(path, overwrite) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            check(tmp)
    elif src.is_file():
        with _open_zip(src, str(src)) as zf:
            unpack(zf, all_members(zf), path, overwrite, check)
    else:
        raise FetchError(f"--archive {src} does not exist: give the directory (or a zip of it) fetched by hand")
    return Fetched(path, _files_under(path))
