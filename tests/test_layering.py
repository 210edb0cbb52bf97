"""The packages import one way, experiments -> eval -> train -> model, and no two files import
each other, directly or round a longer circle: read from the sources' import statements (those
inside functions too, so a lazy import cannot hide an arrow back up)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ['model', 'train', 'eval', 'experiments']  # each may import those before it


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-len('.py')].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _sources() -> dict[str, str]:
  out = {}
  for layer in LAYERS:
    for directory, _, files in os.walk(os.path.join(ROOT, layer)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(directory, name)
          out[_module_name(path)] = path
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The project modules `path` imports ('from a import b' counts as a.b where a.b is one)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f'{node.module}.{alias.name}' for alias in node.names] + [node.module]
    else:
      continue
    for name in names:
      if name in modules:
        found.add(name)
  return found


GRAPH = {name: _imports(path, _sources()) for name, path in _sources().items()}


def _layer(module: str) -> int:
  return LAYERS.index(module.split('.')[0])


def test_the_checker_sees_imports_inside_functions():
  imports = GRAPH['eval.sample']  # imports its libraries inside main(), for a fast --help
  assert 'model.decode' in imports and 'train.restore' in imports


def test_no_arrow_points_up():
  upward = sorted(f'{a} -> {b}' for a, targets in GRAPH.items() for b in targets
                  if _layer(b) > _layer(a))
  assert upward == []


def _package_edges(graph):
  """Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first, and a package's `__init__`
  names its own submodules as `from a import b`: neither is an arrow of its own."""
  return {a: {b for b in targets if b != a and not a.startswith(b + '.')}
          for a, targets in graph.items()}


def _cycle(graph) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_circle_between_files():
  assert _cycle(_package_edges(GRAPH)) is None, ' -> '.join(_cycle(_package_edges(GRAPH)))


def test_the_cycle_finder_finds_one():
  with pytest.raises(AssertionError):
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) is None
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
