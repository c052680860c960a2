"""The package's imports go only downward: each module imports modules of lower layers (ARCHITECTURE.md), so the
layout reads like the data flow. Imports under `if TYPE_CHECKING:` (annotations only) are not counted."""

import ast

from conftest import ROOT

# Lower number = lower layer. A module may import its own package's modules and those of lower layers only.
LAYERS = {
  'errors': 0,
  'config': 1,
  'outputs': 1,
  'cli': 2,
  'sharding': 2,
  'data': 3,
  'model': 3,
  'objective': 4,
  'checkpoint_dir': 4,
  'inference': 4,
  'train': 5,
  'api': 5,
  'convert': 5,
  'benchmark': 6,
  'evaluate': 6,
  'generate': 6,
  'print_config': 6,
  'report': 6,
  'gpu_check': 7,
}

# The one exception: config.validate reads the section schemas, the dataclasses whose fields carry each key's allowed
# values (config.section_schemas imports them when it runs; they import config for choice() and bounded()).
SCHEMAS = {'layerskip_jax.model.model_config', 'layerskip_jax.objective.objective_config'}


def _unit(module: str) -> str:
  """The layer unit of a dotted module name: its subpackage or top-level module under layerskip_jax."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else parts[0]


def _imports(tree: ast.AST):
  """(line, imported module) of every layerskip_jax import, skipping `if TYPE_CHECKING:` blocks."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, ast.If) and 'TYPE_CHECKING' in ast.unparse(node.test):
      continue
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # from layerskip_jax import config, outputs: each name is a module
      names = [f'{node.module}.{a.name}' for a in node.names] if node.module == 'layerskip_jax' else [node.module]
    yield from ((node.lineno, n) for n in names if n.startswith('layerskip_jax.'))
    yield from _imports(node)


def test_imports_only_go_downward():
  package = ROOT / 'layerskip_jax'
  wrong = []
  for path in sorted(package.rglob('*.py')):
    module = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
    if module in ('layerskip_jax.__init__', 'layerskip_jax.__main__'):
      continue
    unit = _unit(module)
    assert unit in LAYERS, f'{path}: add its package or module {unit!r} to LAYERS (and to ARCHITECTURE.md)'
    for line, imported in _imports(ast.parse(path.read_text())):
      target = _unit(imported)
      if unit == 'config' and imported in SCHEMAS:
        continue
      if target != unit and LAYERS.get(target, 99) >= LAYERS[unit]:
        wrong.append(
          f'{path.relative_to(ROOT)}:{line}: {unit} (layer {LAYERS[unit]}) imports {imported} '
          f'(layer {LAYERS.get(target)})'
        )
  assert not wrong, '\n'.join(wrong)


def test_the_check_sees_an_upward_import():
  """The walk finds imports nested in functions (the lazy imports a module might hide an upward one in)."""
  tree = ast.parse('def f():\n  from layerskip_jax.train.step import compiled_train_step\n')
  assert [m for _, m in _imports(tree)] == ['layerskip_jax.train.step']
  tree = ast.parse('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from layerskip_jax.api import X\n')
  assert [m for _, m in _imports(tree)] == []
