"""The package's import direction: building blocks know no model, models know no tool, and nothing is circular.

Every `import` statement of every module counts, including those inside functions (a lazy import still ties
the two modules together). Layers, from the bottom:

    version, _utils  <  families, layers/, core/  <  checkpoints/, pretrained  <  models/  <  everything else

A module may import modules of its own layer or below; inside one layer the graph must have no cycle.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = 'timm_layerattn'
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS = (
    ('version', '_utils'),
    ('families', 'layers', 'core'),
    ('checkpoints', 'pretrained'),
    ('models',),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob('*.py')}


def _resolve(module: str, is_package: bool, node: ast.AST, known: Set[str]) -> List[str]:
    """Internal modules an import statement refers to (a submodule when `from pkg import sub` names one)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [n for n in names if n == PACKAGE or n.startswith(PACKAGE + '.')]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split('.') if is_package else module.split('.')[:-1]
        base = base[:len(base) - node.level + 1]
        target = '.'.join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ''
    if not (target == PACKAGE or target.startswith(PACKAGE + '.')):
        return []
    out = []
    for alias in node.names:
        sub = f'{target}.{alias.name}'
        out.append(sub if sub in known else target)
    return out


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    known = set(modules)
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
        is_package = path.name == '__init__.py'
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _resolve(name, is_package, node, known) if d != name)
        graph[name] = {d for d in deps if d in known}
    return graph


def _layer(module: str) -> int:
    first = module.split('.')[1] if '.' in module else ''
    for i, names in enumerate(LAYERS):
        if first in names:
            return i
    return len(LAYERS)


def _parent_packages(module: str) -> Set[str]:
    parts = module.split('.')
    return {'.'.join(parts[:i]) for i in range(1, len(parts))}


def test_the_graph_sees_the_known_edges():
    graph = _graph()
    # A check of the checker: these imports exist (top-level and inside functions).
    assert 'timm_layerattn.models.resnet_trunk' in graph['timm_layerattn.models.resnet_la']
    assert 'timm_layerattn.checkpoints.kcla_mrla' in graph['timm_layerattn.models.resnet_la']
    assert 'timm_layerattn.checkpoints.timm_entry' in graph['timm_layerattn.models._builder']  # lazy import


def test_imports_point_down():
    graph = _graph()
    wrong = [f'{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})'
             for m, deps in graph.items() for d in deps
             if _layer(d) > _layer(m) and d not in _parent_packages(m)]
    assert not wrong, '\n'.join(sorted(wrong))


@pytest.mark.parametrize('layer', ['layers', 'core', 'checkpoints', 'families'])
def test_building_blocks_know_no_model_and_no_tool(layer):
    graph = _graph()
    banned = ('models', 'tools', 'train', 'hub', 'det', 'cli', 'convert', 'demo', 'run')
    bad = [f'{m} imports {d}' for m, deps in graph.items() if m.split('.')[1:2] == [layer] for d in deps
           if d.split('.')[1:2] and d.split('.')[1] in banned]
    assert not bad, '\n'.join(bad)


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components; a package's edge to its own submodules is not a cycle
    # by itself, so parent-package edges are dropped.
    edges = {m: {d for d in deps if d not in _parent_packages(m)} for m, deps in graph.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, 'import cycles: ' + '; '.join(' <-> '.join(c) for c in cycles)
