"""Where a source model came from: its Hub repo id, the commit it was loaded at, and its license.

Transformers 5 configs no longer carry ``_commit_hash``, so the commit is read from what the Hub
client left behind: a model loaded from the Hub has its files in the Hub cache under
``models--{org}--{name}/snapshots/{sha}/``, and a model loaded from such a snapshot folder names
it in its path. Only when neither gives a sha (and the client is online) is the Hub asked
(``HfApi.model_info``). The license comes from the source's model card (cached ``README.md``, or
the card data of the model info).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_SHA = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\](?P<sha>[0-9a-f]{40})(?:[/\\]|$)")


@dataclass
class SourceProvenance:
    """``repo_id``: the source's Hub id (``None`` for a local folder or a model built from a config);
    ``revision``: the resolved commit sha where one is known, else the revision as given;
    ``license``: the license in the source's card, if any."""

    repo_id: str | None
    revision: str | None
    license: str | None


def _card_license(readme: str | os.PathLike | None) -> str | None:
    if not readme or not Path(readme).is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(Path(readme)).data.get("license")
    except Exception:  # noqa: BLE001 - a malformed card only loses the license, never the extraction
        return None


def snapshot_provenance(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, sha)`` of a Hub cache snapshot folder (or a file inside one), else ``None``."""
    match = _SNAPSHOT.search(Path(path).resolve().as_posix())
    if match is None:
        return None
    return match.group("repo").replace("--", "/"), match.group("sha")


def resolve_source(name_or_path: str | os.PathLike | None, revision: str | None = None,
                   query_hub: bool = True) -> SourceProvenance:
    """Provenance of a source loaded from ``name_or_path`` at ``revision`` (a branch, tag or sha).

    - a Hub cache snapshot folder: its repo id and sha; the license from its ``README.md``;
    - another local folder: no repo id, the revision as given, the license from its ``README.md``;
    - a Hub id: the sha the cache maps ``revision`` (default ``main``) to, else (online, with
      ``query_hub``) the Hub's model info; the license from the cached card or the model info.

    Never raises: what cannot be found stays as given (``revision``) or ``None``.
    """
    from .cards import hub_id

    if not name_or_path:
        return SourceProvenance(None, revision, None)
    path = Path(name_or_path)
    if path.exists():
        snapshot = snapshot_provenance(path)
        folder = path if path.is_dir() else path.parent
        license_ = _card_license(folder / "README.md")
        if snapshot is not None:
            return SourceProvenance(snapshot[0], snapshot[1], license_)
        return SourceProvenance(None, revision, license_)
    repo_id = hub_id(name_or_path)
    if repo_id is None:
        return SourceProvenance(None, revision, None)
    sha, license_ = (revision if revision and _SHA.match(revision) else None), None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "README.md"):
        try:
            cached = try_to_load_from_cache(repo_id, filename, revision=revision or "main")
        except Exception:  # noqa: BLE001 - an invalid id or revision: nothing cached
            cached = None
        if isinstance(cached, str):
            snapshot = snapshot_provenance(cached)
            sha = sha or (snapshot[1] if snapshot else None)
            if filename == "README.md":
                license_ = _card_license(cached)
    from huggingface_hub import constants

    if query_hub and (sha is None or license_ is None) and not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(repo_id, revision=sha or revision)
            sha = sha or info.sha
            if license_ is None and info.card_data is not None:
                license_ = info.card_data.get("license")
        except Exception:  # noqa: BLE001 - unreachable Hub, private or deleted repo: keep what is known
            pass
    return SourceProvenance(repo_id, sha or revision, license_)
