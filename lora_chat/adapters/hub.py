"""Push an adapter to the Hugging Face hub, pull one from it, through `huggingface_hub`.

The token comes from where `huggingface_hub` keeps it (`HF_TOKEN`, then `hf auth login`'s file); lorachat never
prints it and never writes it anywhere. Every hub failure (401, 404, 5xx, a timeout, no network) is one line.

Push uploads a whole adapter (verified first) as it is: its `README.md` is already the hub card (YAML front matter
with `base_model`, `base_model_relation: adapter`, `library_name: peft`, `pipeline_tag`, languages, licence,
datasets, tags, `model-index`), and changing it here would break the manifest's hash of it.

Pull lists the repo first and downloads only safetensors and text files into a temporary folder beside the
target. Pickle weights are refused unless `allow_pickle`; when safetensors weights sit beside them, the pickles
are simply skipped. A lorachat adapter must then match its manifest file by file; an adapter from another tool
(no manifest) is accepted with a warning and given a manifest of what it has. Only then is it renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import LorachatError, Where
from .archive import check_against_manifest, is_pickle
from .compat import PEFT_CONFIG, PEFT_WEIGHTS, safetensors_shapes
from .store import FORMAT, MANIFEST, install, read_adapter, staging_dir, verify, write_manifest

DEFAULT_TIMEOUT = 30.0  # seconds for one hub request before it counts as unreachable
# What pull downloads: weights in safetensors, and text (configs, tokenizer, template, card, logs).
TEXT_SUFFIXES = (".json", ".jsonl", ".txt", ".md", ".yaml", ".yml", ".jinja", ".model", ".csv")
_SKIPPED_ALWAYS = (".gitattributes",)


@dataclass(frozen=True)
class Pulled:
    path: Path
    revision: str
    files: int
    warnings: list[str]


def _api(endpoint: str | None) -> Any:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise LorachatError("the hub is switched off here (HF_HUB_OFFLINE=1): unset it to push or pull",
                            Where(field="HF_HUB_OFFLINE"))
    return HfApi(endpoint=_endpoint(endpoint))


def _endpoint(endpoint: str | None) -> str | None:
    """`HF_ENDPOINT` (a mirror, a private hub) read now, not when huggingface_hub was imported."""
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _hub_error(err: Exception, repo: str) -> LorachatError:
    """One line for what the hub said (or did not say); never the token, never a traceback."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where = Where(field=repo)
    if isinstance(err, RevisionNotFoundError):
        return LorachatError("no such revision on the hub (404)", where)
    if isinstance(err, RepositoryNotFoundError):
        return LorachatError("no such repository on the hub, or no access to it with this token (404)", where)
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            return LorachatError("the hub refused the token (401): log in again with `hf auth login` or set "
                                 "HF_TOKEN", where)
        if status == 403:
            return LorachatError("this token may not do that (403): it needs write access", where)
        detail = getattr(err, "server_message", None) or str(err).splitlines()[0]
        return LorachatError(f"the hub answered {status}: {detail}", where)
    if isinstance(err, httpx2.TimeoutException):
        return LorachatError("the hub did not answer in time (timeout); nothing was changed", where)
    return LorachatError(f"cannot reach the hub: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                         where)


def _hub_failures() -> tuple[type[Exception], ...]:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError, httpx2.HTTPError, ConnectionError, TimeoutError)


# ---------------------------------------------------------------- push


def push(adapter: str | Path, repo: str, *, private: bool = False, revision: str | None = None,
         endpoint: str | None = None, say: Callable[[str], None] = lambda line: None) -> str:
    """Upload a whole adapter to `repo` (created if needed); return the commit URL."""
    from huggingface_hub import get_token

    info = read_adapter(adapter)
    problems = verify(info.path)
    if problems:
        raise LorachatError(f"not whole, not pushed: {problems[0]}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""), Where(info.path))
    api = _api(endpoint)
    if get_token() is None:
        raise LorachatError("no Hugging Face token: run `hf auth login` or set HF_TOKEN", Where(field=repo))
    files = [MANIFEST, *info.manifest.get("files", {})]
    try:
        say(f"creating {repo} (private)" if private else f"creating {repo}")
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        say(f"uploading {len(files)} files from {info.path}")
        commit = api.upload_folder(repo_id=repo, folder_path=info.path, revision=revision,
                                   allow_patterns=files, commit_message=f"lorachat: {info.name}")
    except _hub_failures() as err:
        raise _hub_error(err, repo) from None
    except ValueError as err:  # huggingface_hub's word for a card the hub's metadata check refused
        raise LorachatError(" ".join(str(err).split()), Where(info.path / "README.md")) from None
    return commit.commit_url


# ---------------------------------------------------------------- pull


def parse_repo(spec: str) -> tuple[str, str | None]:
    """`USER/NAME[@REVISION]` -> (repo id, revision)."""
    repo, _, revision = spec.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise LorachatError("expected USER/NAME[@REVISION]", Where(field=spec))
    return repo, revision or None


def _wanted(files: list[str], allow_pickle: bool, repo: str) -> tuple[list[str], list[str]]:
    """The files to download, and notes on what is skipped; refuses pickle-only weights without allow_pickle."""
    wanted, skipped, pickles = [], [], []
    for name in files:
        if name in _SKIPPED_ALWAYS:
            continue
        path = PurePosixPath(name)
        if name.startswith("/") or ".." in path.parts:
            raise LorachatError(f"refused: the repo lists an unsafe path {name!r}", Where(field=repo))
        if is_pickle(name):
            pickles.append(name)
        elif name.endswith(".safetensors") or name.lower().endswith(TEXT_SUFFIXES) or "tfevents" in path.name:
            wanted.append(name)
        else:
            skipped.append(name)
    notes = [f"skipped {name} (neither safetensors nor text)" for name in skipped]
    if pickles and allow_pickle:
        wanted += pickles
        notes.append(f"downloaded pickle files because of --allow-pickle: {', '.join(pickles)}")
    elif pickles and PEFT_WEIGHTS in wanted:
        notes.append(f"skipped pickle files (safetensors weights are there): {', '.join(pickles)}")
    elif pickles:
        raise LorachatError(f"refused: the repo's weights are pickle files ({', '.join(pickles)}), which can run "
                            f"code when loaded; pass --allow-pickle only if you trust it", Where(field=repo))
    return sorted(wanted), notes


def pull(spec: str, to: str | Path, *, overwrite: bool = False, allow_pickle: bool = False,
         endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT,
         say: Callable[[str], None] = lambda line: None) -> Pulled:
    """Download `USER/NAME[@REVISION]` into `to/NAME`, checked, atomically; nothing installed on any failure."""
    from huggingface_hub import hf_hub_download

    repo, revision = parse_repo(spec)
    to = Path(to)
    target = to / repo.split("/")[1]
    if target.exists() and not overwrite:
        raise LorachatError(f"{target} exists: kept as it is (pass --overwrite to replace it)", Where(field=repo))
    api = _api(endpoint)
    try:
        info = api.model_info(repo, revision=revision, timeout=timeout)
    except _hub_failures() as err:
        raise _hub_error(err, repo) from None
    wanted, notes = _wanted([s.rfilename for s in info.siblings or []], allow_pickle, repo)
    if PEFT_CONFIG not in wanted:
        raise LorachatError(f"not a PEFT adapter: the repo has no {PEFT_CONFIG}", Where(field=repo))
    to.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target)
    try:
        for name in wanted:
            say(f"downloading {name}")
            try:  # the commit sha, not the branch: every file comes from the same snapshot
                hf_hub_download(repo, name, revision=info.sha, local_dir=staging, endpoint=api.endpoint,
                                etag_timeout=timeout)
            except _hub_failures() as err:
                raise _hub_error(err, repo) from None
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
        if (staging / MANIFEST).is_file():
            check_against_manifest(staging, Where(field=repo))
        else:
            notes.append(_adopt_foreign(staging, repo, info.sha))
        install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Pulled(target, info.sha, len(wanted), notes)


def _adopt_foreign(folder: Path, repo: str, sha: str) -> str:
    """A manifest for an adapter from another tool, from what it has: its files' hashes, its config's base."""
    if not (folder / PEFT_WEIGHTS).is_file():
        raise LorachatError(f"no {PEFT_WEIGHTS}: nothing lorachat can load", Where(field=repo))
    safetensors_shapes(folder / PEFT_WEIGHTS)  # a readable header, or a one-line refusal now
    config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    manifest = {"format": FORMAT, "name": repo.split("/")[1],
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                # Only what the config says: compat then checks the tensor shapes against the base itself.
                "base": {"model_id": config.get("base_model_name_or_path"), "revision": config.get("revision")},
                "origin": {"hub": repo, "revision": sha, "manifest": "written by lorachat on pull"}}
    write_manifest(folder, manifest)
    return f"{repo} has no {MANIFEST} (not made by lorachat): accepted, and a manifest of its files written locally"
