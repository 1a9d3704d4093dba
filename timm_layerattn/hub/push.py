"""Push an exported folder to a Hugging Face Hub model repo (`create_repo` + `upload_folder`).

The folder is validated first (the three files, a registered architecture, a strict reload); only those files
(and `model.onnx`, when config.json records it: `export.hub_files`) are uploaded, from a staging copy whose card
points at the real repo id. `huggingface_hub`'s upload code is imported only when a push happens.
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Union

from .._utils.errors import UserError, first_line
from ..version import __version__
from .card import YOUR_ORG
from .export import HUB_FILES, check_repo_id, hub_files

__all__ = ['PushResult', 'validate_folder', 'push_folder']

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass
class _FolderInfo:
    """What `validate_folder` found: the checked folder and what the push reports about it."""
    folder: Path
    architecture: str
    tag: Optional[str]
    num_classes: int
    files: Dict[str, int]  # name -> size in bytes
    ignored: List[str]
    num_params: int


def validate_folder(folder: PathLike) -> _FolderInfo:
    """Check that `folder` is a loadable export: the three files, a registered architecture, strict reload."""
    import timm
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f'not a folder: {folder}')
    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f'{folder} is missing {", ".join(missing)}; create it with `timm-layerattn export`')
    try:
        config = json.loads((folder / 'config.json').read_text())
        arch = config['architecture']
    except (ValueError, KeyError) as e:
        raise UserError(f'{folder / "config.json"} is not a timm config ({type(e).__name__}: {e})') from None
    if not timm.is_model(arch):
        raise UserError(f"config.json names an unknown architecture '{arch}'")
    readme = (folder / 'README.md').read_text(encoding='utf-8')
    if not readme.startswith('---') or 'library_name: timm' not in readme.split('---', 2)[1]:
        raise UserError(f'{folder / "README.md"} has no model card front matter with library_name: timm')
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:
        raise UserError(f'{folder} does not load through local-dir: ({type(e).__name__}: '
                        f'{str(e).strip().splitlines()[0] if str(e).strip() else ""})') from None
    from ..tools.zoo import count_params
    return _FolderInfo(
        folder=folder,
        architecture=arch,
        tag=config.get('pretrained_cfg', {}).get('tag'),
        num_classes=config.get('num_classes', 0),
        files={f: (folder / f).stat().st_size for f in hub_files(folder)},
        ignored=sorted(p.name for p in folder.iterdir() if p.name not in hub_files(folder)),
        num_params=count_params(model),
    )


@dataclasses.dataclass
class PushResult:
    """What `push_folder` did (or, with `dry_run`, would do)."""
    repo_id: str
    revision: str
    files: List[str]
    dry_run: bool
    commit_oid: Optional[str] = None
    commit_url: Optional[str] = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _stage(info: _FolderInfo, repo_id: str, staging: Path) -> None:
    """Copy the uploaded files to `staging`, pointing the card's placeholder repo id at the real one."""
    for name in info.files:
        src, dst = info.folder / name, staging / name
        if name == 'README.md':
            text = src.read_text(encoding='utf-8')
            text = re.sub(re.escape(YOUR_ORG) + r'/[\w.\-]+', repo_id, text)
            dst.write_text(text, encoding='utf-8')
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def push_folder(
        folder: PathLike,
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        dry_run: bool = False,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
        token: Optional[str] = None,
        print_fn=print,
) -> PushResult:
    """Upload an exported folder to a Hub model repo (`create_repo` + `upload_folder`).

    The folder is validated first (see `validate_folder`). Only `config.json`, `model.safetensors`,
    `README.md` and an exported `model.onnx` are uploaded. With `dry_run`, nothing is sent: the plan is printed
    and returned.
    """
    check_repo_id(repo_id)
    info = validate_folder(folder)
    revision_name = revision or 'main'
    from huggingface_hub import get_token
    token = token or get_token()
    if not token and not dry_run:
        raise UserError('no Hugging Face token found: set HF_TOKEN or run `hf auth login` (see --dry-run to check '
                        'the folder without one)')
    where = f'{repo_id} ({"private" if private else "public"} model repo, revision {revision_name}'
    where += ', as a pull request)' if create_pr else ')'
    print_fn(f'{"would upload" if dry_run else "uploading"} {info.folder} -> {where}')
    for name, size in info.files.items():
        print_fn(f'  {name:<18} {size:>12,d} bytes  sha256 {_sha256(info.folder / name)[:16]}')
    if info.ignored:
        print_fn(f'  not uploaded: {", ".join(info.ignored)}')
    print_fn(f"  checked: loads as '{info.architecture}' through local-dir: ({info.num_params:,} params, "
             f'{info.num_classes} classes)')
    files = list(info.files)
    if dry_run:
        print_fn(f'  token: {"found" if token else "NOT found (set HF_TOKEN or run `hf auth login` before pushing)"}')
        return PushResult(repo_id=repo_id, revision=revision_name, files=files, dry_run=True)

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(token=token, library_name='timm_layerattn', library_version=__version__)
    message = commit_message or f'Upload {info.architecture}{"." + info.tag if info.tag else ""} (timm_layerattn)'
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        repo_id = getattr(url, 'repo_id', None) or repo_id
        if revision and revision != 'main' and not create_pr and not revision.startswith('refs/') \
                and not re.fullmatch(r'[0-9a-f]{40}', revision):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix='timm_layerattn_push_') as staging:
            _stage(info, repo_id, Path(staging))
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=staging, repo_type='model', revision=revision,
                commit_message=message, allow_patterns=files, create_pr=create_pr)
    except HfHubHTTPError as e:
        raise UserError(f'push to {repo_id} failed: {first_line(e)}') from None
    except OSError as e:  # network errors (connection refused, DNS, timeouts)
        raise UserError(f'push to {repo_id} failed, the Hub could not be reached: {first_line(e)}') from None
    except Exception as e:
        if type(e).__module__.startswith(('httpx', 'httpcore')):
            raise UserError(f'push to {repo_id} failed, the Hub could not be reached: {first_line(e)}') from None
        raise
    oid = getattr(commit, 'oid', None)
    print_fn(f'pushed: commit {oid}')
    print_fn(f"load it with: timm.create_model('hf-hub:{repo_id}@{oid}', pretrained=True)  (after import "
             f'timm_layerattn)')
    return PushResult(repo_id=repo_id, revision=revision_name, files=files, dry_run=False, commit_oid=oid,
                      commit_url=getattr(commit, 'commit_url', None))
