"""What a compiled XLA program does, read from its HLO text (`Compiled.as_text()`): how often each
instruction runs, its matrix-multiply FLOPs, the HBM bytes it moves, and its collectives.

XLA's own cost analysis (`Compiled.cost_analysis()`) counts the body of a while loop once, and a
training call is loops: its steps (`lax.scan`) and, with scanned layers, its layers. Here every
instruction is weighted by the trip counts of the loops around it, read from each loop's condition
(`counter < N`, the form `lax.scan` and `fori_loop` compile to, with the counter starting at 0 as
theirs do); a loop whose count cannot be read (a `while_loop` with a data-dependent exit, as in
decoding) counts once and is reported in `unknown_loops`.

FLOPs are those of `dot` and `convolution` instructions (the TPU compiler writes many matmuls as
convolutions), counted as XLA's HloCostAnalysis counts them: 2 x multiply-adds, over the window
positions that fall on the input (not on padding). HBM bytes are, for each instruction that is
not inside a fusion, the bytes of its operands and results that live in memory space 0 (HBM; the
TPU compiler marks buffers it placed elsewhere, such as VMEM, with S(n)); a slice read from a
larger operand, or an update written in place, counts its own size, not the whole buffer's.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                'c128': 16}
_COMMENT = re.compile(r'/\*.*?\*/')
_HEADER = re.compile(r'^(ENTRY )?%(\S+) ')
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([\d,]*)\](?:\{([^}]*)\})?')
_SPACE = re.compile(r'S\((\d+)\)')
_NAME = re.compile(r'%([\w.\-]+)')
# Instructions that move no data of their own (bookkeeping, or control flow whose bodies count).
_NO_TRAFFIC = {'parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast', 'while',
               'conditional', 'call', 'after-all', 'partition-id', 'replica-id', 'opt-barrier',
               'add-dependency', 'copy-done', 'iota'}
_SLICES = ('dynamic-slice', 'slice')


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  dims: tuple[int, ...]
  space: int        # memory space: 0 is HBM

  @property
  def bytes(self) -> float:
    return math.prod(self.dims) * _DTYPE_BYTES.get(self.dtype, 0)


@dataclasses.dataclass
class Instruction:
  name: str
  arrays: list[Array]     # the result's arrays (several for a tuple)
  opcode: str
  operands: list[str]     # names of the operand instructions (a constant's literal, for one)
  attrs: str


@dataclasses.dataclass
class Computation:
  name: str
  instructions: dict[str, Instruction]  # in program order
  root: Instruction | None = None


def arrays(shape: str) -> list[Array]:
  """The arrays of an HLO shape ('bf16[2,64]{1,0:T(8,128)(2,1)S(1)}', or a tuple of them)."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    space = _SPACE.search(layout or '')
    out.append(Array(dtype, tuple(int(d) for d in dims.split(',') if d),
                     int(space.group(1)) if space else 0))
  return out


def _split_balanced(text: str, stop: str) -> tuple[str, str]:
  """(text before the first `stop` outside brackets, the rest after it)."""
  depth = 0
  for i, ch in enumerate(text):
    if ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == stop and depth == 0:
      return text[:i], text[i + 1:]
  return text, ''


def _instruction(line: str) -> Instruction:
  name, rest = line.strip().removeprefix('ROOT ').split(' = ', 1)
  shape, rest = _split_balanced(rest, ' ')
  opcode, rest = rest.split('(', 1)
  operands, attrs = _split_balanced('(' + rest, ',')
  names = []
  for operand in _split_balanced_all(operands[1:-1]):
    token = operand.split()[-1] if operand.split() else ''
    names.append(token.lstrip('%'))
  return Instruction(name.lstrip('%'), arrays(shape), opcode, names, attrs)


def _split_balanced_all(text: str) -> list[str]:
  parts = []
  while text.strip():
    part, text = _split_balanced(text, ',')
    parts.append(part)
  return parts


def parse(text: str) -> tuple[dict[str, Computation], str]:
  """The module's computations by name, and the name of its entry computation."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header and line.rstrip().endswith('{'):
        current = Computation(header.group(2), {})
        entry = header.group(2) if header.group(1) else entry
      continue
    if line.startswith('}'):
      computations[current.name] = current
      current = None
      continue
    line = _COMMENT.sub('', line)
    if ' = ' not in line:
      continue
    inst = _instruction(line)
    current.instructions[inst.name] = inst
    if line.lstrip().startswith('ROOT '):
      current.root = inst
  return computations, entry


# ---------------------------------------------------------------------------------------------
# How often each computation runs.

_CALL_KEYS = ('calls', 'to_apply', 'body', 'condition', 'true_computation', 'false_computation',
              'branch_computations', 'called_computations')


def callees(inst: Instruction) -> list[tuple[str, str]]:
  """(attribute, computation name) for each computation the instruction calls."""
  out = []
  for key in _CALL_KEYS:
    for match in re.finditer(rf'\b{key}=(\{{[^}}]*\}}|%[\w.\-]+)', inst.attrs):
      out.extend((key, name) for name in _NAME.findall(match.group(1)))
  return out


def _sequential(inst: Instruction, key: str) -> bool:
  """Whether a callee runs as instructions of its own (a loop body, a branch, a call), rather
  than inside its caller (a fusion, a reducer, an async collective)."""
  return (inst.opcode == 'while' or inst.opcode == 'conditional'
          or (inst.opcode == 'call' and key == 'to_apply'))


def _constant(comp: Computation, name: str) -> int | None:
  inst = comp.instructions.get(name)
  if inst is None or inst.opcode != 'constant' or not inst.operands:
    return None
  try:
    return int(inst.operands[0])
  except ValueError:
    return None


def _through(inst: Instruction, comp: Computation) -> Instruction:
  """The instruction a copy (or a chain of them) passes on."""
  while inst.opcode == 'copy' and inst.operands[0] in comp.instructions:
    inst = comp.instructions[inst.operands[0]]
  return inst


def trip_count(loop: Instruction, caller: Computation,
               computations: dict[str, Computation]) -> int | None:
  """How many times a while loop runs: the count the compiler recorded (CPU and GPU do), else
  N for a condition `counter < N` (or `N > counter`, possibly wrapped in a fusion) with N a
  constant and the counter a tuple element starting at a constant (0 when that is not found)."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
  if known:
    return int(known.group(1))
  condition = computations[dict(callees(loop))['condition']]
  compare, operands = condition.root, condition.root.operands if condition.root else []
  if compare is not None and compare.opcode == 'fusion':  # compare(param 0, param 1), fused
    fused = computations[dict(callees(compare))['calls']]
    params = {i.name: int(i.operands[0]) for i in fused.instructions.values()
              if i.opcode == 'parameter'}
    operands = [compare.operands[params[n]] if n in params else n for n in fused.root.operands]
    compare = fused.root
  if compare is None or compare.opcode != 'compare' or len(operands) != 2:
    return None
  direction = re.search(r'direction=(\w+)', compare.attrs)
  counter, bound = {'LT': operands, 'GT': operands[::-1]}.get(
      direction.group(1) if direction else '', (None, None))
  limit = _constant(condition, bound) if bound else None
  counter = condition.instructions.get(counter or '')
  if limit is None or counter is None or counter.opcode != 'get-tuple-element':
    return None
  index = int(re.search(r'index=(\d+)', counter.attrs).group(1))
  start = 0
  init = caller.instructions.get(loop.operands[0])
  if init is not None and init.opcode == 'tuple' and index < len(init.operands):
    first = caller.instructions.get(init.operands[index])
    value = _constant(caller, _through(first, caller).name) if first else None
    start = 0 if value is None else value
  return max(limit - start, 0)


def multipliers(computations: dict[str, Computation],
                entry: str) -> tuple[dict[str, float], int]:
  """How many times each computation runs per call of the program, and the number of loops
  whose trip count could not be read (counted once)."""
  order, seen = [], set()

  def visit(name):  # depth-first post-order: callees before their callers
    seen.add(name)
    for inst in computations[name].instructions.values():
      for _, callee in callees(inst):
        if callee not in seen and callee in computations:
          visit(callee)
    order.append(name)

  visit(entry)
  runs = {name: 0.0 for name in order}
  runs[entry] = 1.0
  unknown = 0
  for name in reversed(order):  # callers before callees
    comp = computations[name]
    for inst in comp.instructions.values():
      count = 1
      if inst.opcode == 'while':
        trips = trip_count(inst, comp, computations)
        unknown += trips is None
        count = 1 if trips is None else trips
      for key, callee in callees(inst):
        if callee in runs:
          runs[callee] += runs[name] * (count if key == 'body' else 1)
  return runs, unknown


# ---------------------------------------------------------------------------------------------
# FLOPs, bytes and collectives of single instructions.


def _window(attrs: str, field: str, spatial: int, default: int) -> list[tuple[int, ...]]:
  match = re.search(rf'\b{field}=([\d_x\-]+)', attrs)
  if not match:
    return [(default,)] * spatial
  return [tuple(int(v) for v in part.split('_')) for part in match.group(1).split('x')]


def _valid_positions(size: int, window: int, out: int, stride: int, low: int, lhs_dilation: int,
                     rhs_dilation: int) -> int:
  """(output position, window position) pairs of one spatial dimension that land on the input."""
  count = 0
  for o in range(out):
    for k in range(window):
      position = o * stride - low + k * rhs_dilation
      if position >= 0 and position % lhs_dilation == 0 and position // lhs_dilation < size:
        count += 1
  return count


def matmul_flops(inst: Instruction, comp: Computation) -> float:
  """2 x the multiply-adds of a dot or convolution instruction; 0 for any other."""
  if inst.opcode == 'dot':
    lhs = comp.instructions[inst.operands[0]].arrays[0]
    dims = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', inst.attrs)
    contracted = [lhs.dims[int(d)] for d in dims.group(1).split(',') if d] if dims else []
    return 2.0 * math.prod(inst.arrays[0].dims) * math.prod(contracted)
  if inst.opcode != 'convolution':
    return 0.0
  lhs = comp.instructions[inst.operands[0]].arrays[0]
  rhs = comp.instructions[inst.operands[1]].arrays[0]
  out = inst.arrays[0]
  lhs_labels, rhs_labels, out_labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)',
                                                 inst.attrs).groups()
  spatial = len(lhs_labels) - 2
  sizes = _window(inst.attrs, 'size', spatial, 1)
  strides = _window(inst.attrs, 'stride', spatial, 1)
  pads = _window(inst.attrs, 'pad', spatial, 0)
  lhs_dilations = _window(inst.attrs, 'lhs_dilate', spatial, 1)
  rhs_dilations = _window(inst.attrs, 'rhs_dilate', spatial, 1)
  positions = 1
  for d in range(spatial):
    positions *= _valid_positions(
        lhs.dims[lhs_labels.index(str(d))], rhs.dims[rhs_labels.index(str(d))],
        out.dims[out_labels.index(str(d))], strides[d][0], pads[d][0], lhs_dilations[d][0],
        rhs_dilations[d][0])
  groups = re.search(r'feature_group_count=(\d+)', inst.attrs)
  batch_groups = re.search(r'batch_group_count=(\d+)', inst.attrs)
  fma = (lhs.dims[lhs_labels.index('f')] // (int(groups.group(1)) if groups else 1)
         * rhs.dims[rhs_labels.index('o')]
         * lhs.dims[lhs_labels.index('b')] // (int(batch_groups.group(1)) if batch_groups else 1)
         * positions)
  return 2.0 * fma


def _hbm(items: list[Array]) -> float:
  return sum(a.bytes for a in items if a.space == 0)


def _operand_arrays(inst: Instruction, comp: Computation) -> list[list[Array]]:
  return [comp.instructions[n].arrays if n in comp.instructions else [] for n in inst.operands]


def _parameters(fused: Computation) -> dict[int, str]:
  return {int(i.operands[0]): i.name for i in fused.instructions.values()
          if i.opcode == 'parameter'}


def _read_bytes(param: str, fused: Computation, computations: dict[str, Computation],
                whole: float) -> float:
  """Bytes a fused computation reads of its parameter `param` (`whole` bytes in HBM): only its
  slices where every use slices it, also through fusions nested inside; else all of it."""
  read = 0.0
  for user in fused.instructions.values():
    for index, operand in enumerate(user.operands):
      if operand != param:
        continue
      if user.opcode in _SLICES and index == 0:
        read += sum(a.bytes for a in user.arrays)
      elif user.opcode == 'fusion':
        nested = computations[dict(callees(user))['calls']]
        read += _read_bytes(_parameters(nested)[index], nested, computations, whole)
      else:
        return whole
  return min(read, whole)


def _fusion_bytes(inst: Instruction, comp: Computation,
                  computations: dict[str, Computation]) -> float:
  """Bytes a fusion moves: each operand whole, except one only sliced inside (the slices) or
  updated in place (nothing); each result whole, except one written in place (the update)."""
  fused = computations[dict(callees(inst))['calls']]
  params = _parameters(fused)
  outputs = ([fused.instructions[n] for n in fused.root.operands]
             if fused.root.opcode == 'tuple' else [fused.root])
  in_place = set()
  written = 0.0
  for j, out in enumerate(outputs):
    space = inst.arrays[j].space if j < len(inst.arrays) else 0
    if out.opcode == 'dynamic-update-slice' and out.operands[0] in params.values():
      in_place.add(out.operands[0])
      update = fused.instructions[out.operands[1]].arrays
      written += sum(a.bytes for a in update) if space == 0 else 0
    elif j < len(inst.arrays):
      written += _hbm([inst.arrays[j]])
  read = 0.0
  for index, operand in enumerate(_operand_arrays(inst, comp)):
    param, whole = params.get(index), _hbm(operand)
    if param is not None and param not in in_place and whole:
      read += _read_bytes(param, fused, computations, whole)
  return read + written


def hbm_bytes(inst: Instruction, comp: Computation,
              computations: dict[str, Computation]) -> float:
  """Bytes an instruction outside any fusion reads from and writes to HBM."""
  op = inst.opcode
  if op in _NO_TRAFFIC or op.endswith('-done') or 'custom_call_target="AllocateBuffer"' in \
      inst.attrs:
    return 0.0
  operands = _operand_arrays(inst, comp)
  if op == 'copy-start':  # result: (destination, source, context)
    return _hbm(operands[0]) + _hbm(inst.arrays[:1])
  if op in _SLICES:
    return _hbm(inst.arrays) * (2 if _hbm(operands[0]) else 1)
  if op == 'dynamic-update-slice':
    return 2 * sum(a.bytes for a in operands[1]) if inst.arrays[0].space == 0 else 0.0
  if op == 'fusion':
    return _fusion_bytes(inst, comp, computations)
  return sum(_hbm(o) for o in operands) + _hbm(inst.arrays)


def collective(inst: Instruction, comp: Computation) -> tuple[str, float] | None:
  """(kind, bytes) of a collective: the bytes of the whole buffer it reduces, gathers or sends
  (an all-gather's result, the others' operands). The TPU compiler writes a reduce-scatter as an
  all-reduce in a fusion named all-reduce-scatter (each chip keeps its slice of the sum)."""
  kind = inst.opcode.removesuffix('-start').removeprefix('ragged-')
  if kind not in COLLECTIVES:
    return None
  if kind == 'all-reduce' and comp.name.startswith('all-reduce-scatter'):
    kind = 'reduce-scatter'
  if kind == 'all-gather':
    result = inst.arrays[len(inst.arrays) // 2:] if inst.opcode.endswith('-start') else inst.arrays
    return kind, sum(a.bytes for a in result)
  return kind, sum(a.bytes for o in _operand_arrays(inst, comp) for a in o)


# ---------------------------------------------------------------------------------------------
# The whole program.


@dataclasses.dataclass
class ProgramStats:
  """Per call of the program, on one chip. `ops`: (runs, FLOPs, HBM bytes) of each instruction
  outside fusions (a fusion carrying its fused matmuls' FLOPs), for the roofline."""
  matmul_flops: float
  hbm_bytes: float
  collectives: dict[str, dict[str, float]]   # kind -> ops (in the text), runs, bytes (per call)
  unknown_loops: int
  ops: list[tuple[float, float, float]]

  def roofline_seconds(self, peak_flops: float, hbm_bandwidth: float) -> tuple[float, float]:
    """(seconds, of which memory-bound) if every instruction ran at the chip's peak rate or its
    HBM bandwidth, whichever bounds it, one after another; collectives and vector work are not
    counted (an optimistic estimate)."""
    total = memory = 0.0
    for runs, flops, moved in self.ops:
      compute_s, memory_s = flops / peak_flops, moved / hbm_bandwidth
      total += runs * max(compute_s, memory_s)
      memory += runs * memory_s if memory_s > compute_s else 0.0
    return total, memory


def analyze(text: str) -> ProgramStats:
  computations, entry = parse(text)
  runs, unknown = multipliers(computations, entry)
  sequential = {entry}
  for name in runs:
    for inst in computations[name].instructions.values():
      sequential.update(c for key, c in callees(inst) if _sequential(inst, key))

  fused_flops = {}

  def flops_inside(name: str) -> float:  # matmuls of a fused computation and its own callees
    if name not in fused_flops:
      comp = computations[name]
      fused_flops[name] = sum(matmul_flops(i, comp) + sum(flops_inside(c) for k, c in callees(i)
                                                          if not _sequential(i, k))
                              for i in comp.instructions.values())
    return fused_flops[name]

  collectives = {kind: {'ops': 0, 'runs': 0.0, 'bytes': 0.0} for kind in COLLECTIVES}
  ops = []
  for name, count in runs.items():
    comp = computations[name]
    for inst in comp.instructions.values():
      found = collective(inst, comp)
      if found:
        kind, size = found
        collectives[kind]['ops'] += 1
        collectives[kind]['runs'] += count
        collectives[kind]['bytes'] += count * size
      if name in sequential:
        flops = matmul_flops(inst, comp) + sum(flops_inside(c) for k, c in callees(inst)
                                               if not _sequential(inst, k))
        ops.append((count, flops, hbm_bytes(inst, comp, computations)))
  return ProgramStats(sum(r * f for r, f, _ in ops), sum(r * b for r, _, b in ops),
                      collectives, unknown, ops)
