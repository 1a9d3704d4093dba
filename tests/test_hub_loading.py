"""`hf-hub:` loading and `push`, end to end through the real `huggingface_hub` client and timm's loaders,
against a loopback server that serves exported folders the way the Hub does (`_hub_server.py`).

`huggingface_hub` reads `HF_ENDPOINT`, `HF_HOME` and `HF_HUB_OFFLINE` when it is imported, so every scenario
runs in a fresh Python process with those set; the process reports what it loaded (weights and logits)
in a safetensors file that the test compares, bit for bit, with the source models.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest
import safetensors.torch
import timm
import torch

import timm_layerattn  # noqa: F401
from timm_layerattn import export_folder

from _hub_server import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = 'cifar_resnet20_kcla'
REPO = 'acme/cifar_resnet20_kcla.test'

# Runs in the child process: loads every case of a JSON spec, saves weights / logits / errors.
_CHILD = textwrap.dedent('''
    import json, sys, torch, safetensors.torch
    torch.set_num_threads(1)
    import timm, timm_layerattn
    # `import timm_layerattn` must not pull in the export / conversion code or huggingface_hub's upload code
    heavy = [m for m in ('timm_layerattn.hub', 'timm_layerattn.convert', 'huggingface_hub.repocard',
                         'huggingface_hub._commit_api') if m in sys.modules]
    from timm_layerattn.cli import main as cli_main
    spec = json.load(open(sys.argv[1]))
    x = safetensors.torch.load_file(spec['input'])['x']
    tensors, report = {}, {'heavy_imports': heavy}
    for case in spec['cases']:
        name = case['name']
        try:
            if case.get('register'):
                timm_layerattn.register_pretrained(case['register'], hf_hub_id=case['hf_hub_id'])
            if case.get('push'):
                report[name + '.push_rc'] = cli_main(case['push'])
            if case.get('model') is None:
                continue
            model = timm.create_model(case['model'], pretrained=True, **case.get('kwargs', {})).eval()
            with torch.no_grad():
                tensors[name + '/logits'] = model(x if model.in_chans == 3 else x[:, :1]).contiguous()
                tensors[name + '/features'] = model.forward_features(x if model.in_chans == 3 else x[:, :1])
            for k, v in model.state_dict().items():
                tensors[name + '/sd/' + k] = v.contiguous()
            report[name] = {'ok': True, 'tag': model.pretrained_cfg.get('tag'),
                            'hf_hub_id': model.pretrained_cfg.get('hf_hub_id')}
        except Exception as e:
            report[name] = {'ok': False, 'error': type(e).__name__, 'message': str(e)[:300]}
    safetensors.torch.save_file(tensors, spec['output'])
    json.dump(report, open(spec['report'], 'w'))
''')


def _trained_like(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(NAME)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point() and not k.endswith('norm_d'):
                v.add_(torch.rand_like(v) * 0.1 if k.endswith('running_var') else torch.randn_like(v) * 0.05)
    return model.eval()


def _folder_files(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


class _Env:
    """The loopback Hub, two exported versions of one repo, and a runner for child processes."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.hub = FakeHub().start()
        self.models = {'v1': _trained_like(1), 'v2': _trained_like(2)}
        self.folders = {}
        for version, model in self.models.items():
            self.folders[version] = export_folder(
                model, tmp / version, model_name=NAME, tag='test', dataset='cifar10', metrics={'top1': 90.0})
        self.sha1 = self.hub.add_commit(REPO, _folder_files(self.folders['v1']))
        self.hub.add_tag(REPO, 'v1', self.sha1)
        self.sha2 = self.hub.add_commit(REPO, _folder_files(self.folders['v2']))
        self.x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        safetensors.torch.save_file({'x': self.x}, str(tmp / 'x.safetensors'))
        self.hf_home = tmp / 'hf_home'
        self.runs = 0

    def env(self, **extra: str) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get('PYTHONPATH', '')]),
            HF_ENDPOINT=self.hub.endpoint, HF_HOME=str(self.hf_home), HF_HUB_DISABLE_TELEMETRY='1',
            HF_HUB_DISABLE_PROGRESS_BARS='1', OMP_NUM_THREADS='1')
        env.update(extra)
        return env

    def run(self, cases, **env):
        self.runs += 1
        spec = {'input': str(self.tmp / 'x.safetensors'), 'cases': cases,
                'output': str(self.tmp / f'out{self.runs}.safetensors'),
                'report': str(self.tmp / f'rep{self.runs}.json')}
        (self.tmp / 'spec.json').write_text(json.dumps(spec))
        (self.tmp / 'child.py').write_text(_CHILD)
        r = subprocess.run([sys.executable, str(self.tmp / 'child.py'), str(self.tmp / 'spec.json')],
                           env=self.env(**env), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        tensors = safetensors.torch.load_file(spec['output'])
        report = json.loads(Path(spec['report']).read_text())
        return tensors, report, r

    def expect(self, version: str, case: str = ""):
        model = self.models[version]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return model(self.x), model.forward_features(self.x), model.state_dict()
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    e = _Env(tmp_path_factory.mktemp('hub'))
    yield e
    e.hub.stop()


def _state(tensors, case):
    prefix = case + '/sd/'
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _assert_same_model(tensors, case, env, version):
    logits, _, sd = env.expect(version, case)
    loaded = _state(tensors, case)
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items()), f'{case}: weights differ from {version}'
    assert torch.equal(tensors[case + '/logits'], logits), f'{case}: logits differ from {version}'


def _online_cases(env):
    return [
        {'name': 'main', 'model': f'hf-hub:{REPO}'},
        {'name': 'sha', 'model': f'hf-hub:{REPO}@{env.sha1}'},
        {'name': 'tag', 'model': f'hf-hub:{REPO}@v1'},
        {'name': 'classes5', 'model': f'hf-hub:{REPO}', 'kwargs': {'num_classes': 5}},
        {'name': 'chans1', 'model': f'hf-hub:{REPO}', 'kwargs': {'in_chans': 1}},
        {'name': 'registered', 'model': NAME, 'register': f'{NAME}.acme', 'hf_hub_id': f'{REPO}@v1'},
        {'name': 'registered_tag', 'model': f'{NAME}.acme'},
        {'name': 'missing_repo', 'model': 'hf-hub:acme/does_not_exist'},
        {'name': 'missing_rev', 'model': f'hf-hub:{REPO}@v9'},
        {'name': 'pushed', 'model': 'hf-hub:acme/pushed@dev',
         'push': ['push', str(env.folders['v2']), '--repo-id', 'acme/pushed', '--revision', 'dev', '--private']},
    ]


def _check_latest_and_pinned(tensors, report, env):
    assert report['main']['ok'] and report['main']['hf_hub_id'] == REPO and report['main']['tag'] == 'test'
    _assert_same_model(tensors, 'main', env, 'v2')
    for case in ('sha', 'tag'):
        assert report[case]['ok'], report[case]
        _assert_same_model(tensors, case, env, 'v1')
    assert not report['missing_rev']['ok'] and report['missing_rev']['error'] == 'RevisionNotFoundError'
    assert not report['missing_repo']['ok'] and report['missing_repo']['error'] == 'RepositoryNotFoundError'


def _check_changed_classes_and_channels(tensors, report, env):
    _, features, sd = env.expect('v2', 'classes5')
    assert report['classes5']['ok'] and tensors['classes5/logits'].shape == (2, 5)
    assert torch.equal(tensors['classes5/features'], features)
    assert all(torch.equal(v, sd[k]) for k, v in _state(tensors, 'classes5').items() if not k.startswith('fc.'))
    assert report['chans1']['ok'], report['chans1']
    grey = _state(tensors, 'chans1')
    assert torch.equal(grey['conv1.weight'], sd['conv1.weight'].sum(1, keepdim=True))
    assert all(torch.equal(v, sd[k]) for k, v in grey.items() if k != 'conv1.weight')


def _check_registered(tensors, report, env):
    for case in ('registered', 'registered_tag'):
        assert report[case]['ok'], report[case]
        assert report[case]['tag'] == 'acme' and report[case]['hf_hub_id'] == f'{REPO}@v1'
        _assert_same_model(tensors, case, env, 'v1')


def _check_pushed(tensors, report, env):
    assert report['pushed.push_rc'] == 0
    assert report['pushed']['ok'], report['pushed']
    _assert_same_model(tensors, 'pushed', env, 'v2')
    repo = env.hub.repos['acme/pushed']
    assert repo.private and 'dev' in repo.branches
    files = env.hub.files('acme/pushed', 'dev')
    assert sorted(files) == ['README.md', 'config.json', 'model.safetensors']
    assert files['model.safetensors'] == (env.folders['v2'] / 'model.safetensors').read_bytes()
    readme = files['README.md'].decode()
    assert "hf-hub:acme/pushed'" in readme and '<your-org>' not in readme
    assert '<your-org>' in (env.folders['v2'] / 'README.md').read_text()  # the local folder is untouched


def _check_offline(env):
    """After the first downloads, `HF_HUB_OFFLINE=1` loads from the cache and sends nothing to the server."""
    before = len(env.hub.requests)
    cases = [
        {'name': 'main', 'model': f'hf-hub:{REPO}'},
        {'name': 'tag', 'model': f'hf-hub:{REPO}@v1'},
        {'name': 'sha', 'model': f'hf-hub:{REPO}@{env.sha1}'},
        {'name': 'registered', 'model': NAME, 'register': f'{NAME}.acme', 'hf_hub_id': f'{REPO}@v1'},
        {'name': 'uncached', 'model': 'hf-hub:acme/never_downloaded'},
        # no HF_TOKEN and no token file in this process: push must stop before contacting anything
        {'name': 'no_token', 'model': None, 'push': ['push', str(env.folders['v1']), '--repo-id', 'acme/x']},
    ]
    tensors, report, proc = env.run(cases, HF_HUB_OFFLINE='1')
    assert len(env.hub.requests) == before, env.hub.requests[before:]
    assert report['no_token.push_rc'] == 2 and 'acme/x' not in env.hub.repos
    errors = [line for line in proc.stderr.splitlines() if line.startswith('timm-layerattn push: error:')]
    assert len(errors) == 1 and 'no Hugging Face token found' in errors[0] and 'HF_TOKEN' in errors[0]
    _assert_same_model(tensors, 'main', env, 'v2')
    for case in ('tag', 'sha', 'registered'):
        assert report[case]['ok'], report[case]
        _assert_same_model(tensors, case, env, 'v1')
    assert not report['uncached']['ok'] and report['uncached']['error'] == 'LocalEntryNotFoundError'


def test_hub_end_to_end(env):
    """One online process (latest, pinned by sha and tag, changed head / stem, registered tag, push + load), then
    one offline process on the cache it filled (and a push without a token). One test, because each step needs
    the previous one's state and every child process costs seconds. The first process also checks that
    `import timm_layerattn` stays light."""
    tensors, report, _ = env.run(_online_cases(env), HF_TOKEN='hf_test_token')
    assert report['heavy_imports'] == []
    _check_latest_and_pinned(tensors, report, env)
    _check_changed_classes_and_channels(tensors, report, env)
    _check_registered(tensors, report, env)
    _check_pushed(tensors, report, env)
    _check_offline(env)
