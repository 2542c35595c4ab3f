"""The RECKONING authors' processed ProofWriter sets, W&B artifacts of
``epfl_nlp_phd/data-collection`` (their ``scripts/download_data.sh``), fetched with W&B's public
API for ``python -m reckoning_ray.data fetch authors NAME --to DIR``.

``reckoning_ray.core.data.authors`` reads them. Offline the fetch fails within seconds (a probe of
the W&B server with a short timeout comes first) and says how to pass a copy downloaded elsewhere
(``--archive``: the directory ``wandb artifact get`` wrote, or a zip of it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from reckoning_ray.core.data.fetch import DEFAULT_TIMEOUT, FetchError, Fetched, install_copy, probe, staging

AUTHORS_PROJECT = "epfl_nlp_phd/data-collection"
AUTHORS_SETS = tuple(f"owa_proof_{d}_hop{s}" for d in (2, 3, 5) for s in ("", "_dall"))


def artifact_path(name: str) -> str:
    return f"{AUTHORS_PROJECT}/{name}:latest"


def _hint(name: str) -> str:
    return (f"Where there is network, run `wandb artifact get {artifact_path(name)} --root {name}` (W&B needs "
            f"`wandb login` even for public artifacts), copy the {name} directory here and pass --archive {name}")


def _complete(path: Path) -> bool:
    return any(path.rglob("*.jsonl"))


def _check(path: Path) -> None:
    if not any(path.rglob("*.jsonl")):
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())[:8]
        raise FetchError(f"expected the authors' .jsonl files (train.jsonl, dev.jsonl, test.jsonl); found {found or 'no files'}")


def wandb_base_url() -> str:
    """The W&B server ``wandb.Api()`` talks to (WANDB_BASE_URL, else W&B's settings)."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url.rstrip("/")
    import wandb

    return str(wandb.setup().settings.base_url).rstrip("/")


def fetch_authors(name: str, dest: str | os.PathLike, *, archive: Optional[str | os.PathLike] = None,
                  overwrite: bool = False, timeout: float = DEFAULT_TIMEOUT) -> Fetched:
    """The artifact ``epfl_nlp_phd/data-collection/NAME:latest`` in ``dest`` (via a temporary
    directory renamed into place), or the copy ``archive`` (a directory or a zip) installed there."""
    if name not in AUTHORS_SETS:
        raise FetchError(f"unknown authors' set {name!r}: choose one of {', '.join(AUTHORS_SETS)}")
    if archive is not None:
        return install_copy(archive, dest, complete=_complete, check=_check, overwrite=overwrite)
    path = Path(os.path.expanduser(str(dest))).absolute()
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        if _complete(path):
            return Fetched(path, sorted(p for p in path.rglob("*") if p.is_file()), already=True)
        raise FetchError(f"--to {path} is not empty: choose another directory or pass --overwrite")
    base = wandb_base_url()
    try:
        probe(base, timeout)
    except OSError as exc:
        raise FetchError(f"cannot reach the W&B server {base} to download the artifact {artifact_path(name)} "
                         f"({exc}). {_hint(name)}") from None
    import wandb

    with staging(path, overwrite) as tmp:
        try:
            api = wandb.Api(timeout=max(1, int(timeout)), overrides={"base_url": base})
            api.artifact(artifact_path(name)).download(root=str(tmp))
        except Exception as exc:  # wandb raises CommError, UsageError, requests' and its own errors
            raise FetchError(f"cannot download the W&B artifact {artifact_path(name)} from {base} "
                             f"({type(exc).__name__}: {exc}). {_hint(name)}") from None
        _check(tmp)
    return Fetched(path, sorted(p for p in path.rglob("*") if p.is_file()))
