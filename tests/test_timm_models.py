"""timm's own `tests/test_models.py` (from the sdist of the installed timm) over every model of this package.

The file is fetched and cached on first use and imported with its model lists restricted to our names
(`_timm_suite`): every test timm parametrises over `list_models(...)` runs here, with timm's filters, for our
models; a new family is covered without editing anything. Without network and without a cached copy the module
is skipped with the reason (and a warning); under CI (`CI=true`) that is an error instead, so CI cannot skip it.
"""
import fnmatch
import warnings

import pytest

import _timm_suite as suite
from _model_lists import HEAVY

try:
    _timm, _unavailable = suite.load(), None
except suite.Unavailable as e:
    _timm, _unavailable = None, str(e)
if _unavailable is not None:
    if suite.in_ci():
        pytest.fail(f"CI is set: timm's tests/test_models.py must run, but {_unavailable}", pytrace=False)
    warnings.warn(f"timm's tests/test_models.py is not run: {_unavailable}", pytest.PytestWarning)
    pytest.skip(f"timm's tests/test_models.py is unavailable (no network and no cached copy): {_unavailable}",
                allow_module_level=True)

TIMM_TESTS = suite.tests(_timm, heavy=HEAVY)
globals().update(TIMM_TESTS)
globals().update(suite.fixtures(_timm))

# The tests timm's CI runs over every model it lists (its exclusion filters name none of ours).
EVERY_MODEL = (
    'test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_torchscript',
    'test_model_forward_features', 'test_model_forward_intermediates_features', 'test_model_forward_intermediates',
    'test_model_forward_fx', 'test_model_backward_fx',
)
# Architectures timm calls non-standard (`NON_STD_FILTERS`: vision transformers among them) skip these two and have
# their default cfgs checked by a twin test instead (their features by test_model_forward_intermediates_features).
STANDARD_ONLY = ('test_model_default_cfgs', 'test_model_forward_features')
NON_STD_TWIN = 'test_model_default_cfgs_non_std'


@pytest.fixture(autouse=True)
def _timm_jit_settings():
    """TorchScript as timm's test file sets it (profiling executor, no profiling runs), for its tests only."""
    with suite.timm_jit(_timm):
        yield


def test_suite_covers_every_model():
    """The core of timm's file is selected and runs over every registered name, the DeiT models through timm's
    own split for non-standard architectures (a timm release that renames or drops the tests fails here rather
    than running nothing)."""
    names = set(suite.our_names())
    missing = [t for t in (*EVERY_MODEL, NON_STD_TWIN) if t not in TIMM_TESTS]
    assert not missing, f"timm's tests/test_models.py no longer has {missing}"
    non_std = {n for n in names if any(fnmatch.fnmatch(n, f) for f in _timm.NON_STD_FILTERS)}
    assert non_std == {n for n in names if n.startswith('deit_')}, sorted(non_std)
    for t in (*EVERY_MODEL, NON_STD_TWIN):
        expected = non_std if t == NON_STD_TWIN else names - non_std if t in STANDARD_ONLY else names
        covered = {n.split('.', 1)[0] for n in suite.model_names(TIMM_TESTS[t])}
        assert covered == expected, f'{t}: misses {sorted(expected - covered)}, extra {sorted(covered - expected)}'
