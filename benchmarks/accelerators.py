"""jaxnorm.linen against flax.linen, compiled for GPU and TPU targets without the hardware.

Normalization is memory-bound, so the compiled graph decides its speed: how many kernels
it launches and how many bytes they move. This script compiles, ahead of time and on a
CPU-only machine, every case of ``benchmarks/run.py --quick`` (layer × shape × dtype,
or with ``--sweep`` every case of the shared sweep ``sweep.py`` at full size,
forward and forward+backward with respect to the input and the parameters) for an NVIDIA
H200 and for TPU v5e / v6e, for ``jaxnorm.linen.<Layer>`` and ``flax.linen.<Layer>`` built
with the same arguments, and reports from the optimized HLO:

- ``kernels``: instructions of the entry computation (and of the computations its control
  flow calls) that do work: fusions, copies, custom calls, collectives; not parameters,
  tuples, bitcasts, constants, ``opt-barrier`` or TPU's asynchronous HBM->VMEM copies. On GPU also ``launched``: the kernel
  thunks of the executable (``*thunk_sequence.txt`` of ``--xla_dump_to``).
- GPU ``bytes``: "bytes accessed" of XLA's generic cost analysis of the optimized module.
- TPU ``cycles``: the sum of the compiler's ``estimated_cycles`` over the instructions that
  carry one; TPU ``hbm``: bytes that those instructions read from or write to HBM (memory
  space 0; VMEM-resident operands, ``S(1)`` in the layout, do not count), with the tiled
  (padded) layout sizes.
- ``(cond)``: the part of a measure inside ``lax.cond`` branches (the costliest branch of
  each); ``*_common`` ratios leave it out: the path a well-conditioned input takes when
  the other branch is empty.
- ``ideal``: one read of every input (x, variables, dy) and one write of every output
  (y, updated batch statistics, dx, dparams), at their logical sizes.

- GPU structural checks: ``x_sized_writes``, the instructions that write an array with at
  least as many elements as the input that the graph does not return (an extra pass of
  memory traffic besides the outputs y and dx; Flax's listed beside), and whether jaxnorm
  launches more kernels than Flax without moving fewer bytes.

Ratios are jaxnorm/Flax (below 1: jaxnorm is better) and jaxnorm/ideal, with the geometric
mean and the worst case per target. It also counts the collectives of a data-parallel
training step: 8 × (conv -> BatchNorm(axis_name="d") -> relu) under ``shard_map`` over a
TPU v5e 2×2 slice, the gradients ``pmean``-ed, for each BatchNorm class.

Each target family runs in its own virtual environment (never the test environment), by
default ``venvs/aot-gpu`` and ``venvs/aot-tpu`` beside the repository (``--gpu-python``,
``--tpu-python`` or ``$AOT_GPU_PYTHON``, ``$AOT_TPU_PYTHON`` point elsewhere)::

    python3.11 -m venv ../venvs/aot-gpu
    ../venvs/aot-gpu/bin/pip install -r benchmarks/requirements-aot-gpu.txt
    python3.11 -m venv ../venvs/aot-tpu
    ../venvs/aot-tpu/bin/pip install -r benchmarks/requirements-aot-tpu.txt

The H200 target description is ``shared/targets/h200.txtpb`` beside the repository
(``--h200-config``).

Usage (any Python 3.11 runs the driver; it starts one worker per venv, compiling serially)::

    python benchmarks/accelerators.py --json benchmarks/accelerators.json
    python benchmarks/accelerators.py --target h200 --case "LayerNorm 8192x1024 bfloat16"
    python benchmarks/accelerators.py --target h200 --sweep --markdown sweep.md
    python benchmarks/accelerators.py --source ../other-checkout --dump hlo-dump/

The workers run with ``JAX_PLATFORMS=cpu`` (the CUDA plugin then skips its driver check
but still registers its topology) and ``TPU_SKIP_MDS_QUERY=1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
H200_TARGET_CONFIG = REPO.parent / "shared" / "targets" / "h200.txtpb"
VENVS = REPO.parent / "venvs"
DEFAULT_PYTHON = {
    "gpu": os.environ.get("AOT_GPU_PYTHON", str(VENVS / "aot-gpu" / "bin" / "python")),
    "tpu": os.environ.get("AOT_TPU_PYTHON", str(VENVS / "aot-tpu" / "bin" / "python")),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target: its family (which venv compiles it) and its topology."""

    name: str
    family: str
    description: str


TARGETS = {
    "h200": Target("h200", "gpu", "NVIDIA H200 (sm_90a), deviceless CUDA compile"),
    "v5e": Target("v5e", "tpu", "TPU v5e 1x1, deviceless libtpu compile"),
    "v6e": Target("v6e", "tpu", "TPU v6e 1x1, deviceless libtpu compile"),
}

# Instructions that launch nothing and move no bytes.
NO_WORK = frozenset(
    {
        "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-done",
        "after-all", "opt-barrier", "partition-id", "replica-id",
    }
)
# TPU's HBM <-> VMEM prefetches: they move bytes but are DMAs, not kernels.
ASYNC_COPIES = frozenset({"copy-start", "slice-start"})
ARRAY = r"\w+\[[\d,]*\](?:\{[^}]*\})?"
CONTROL_FLOW = frozenset({"conditional", "while", "call"})
COLLECTIVES = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
)
ITEMSIZE = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
    "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
    "c128": 16, "token": 0,
}


# --------------------------------------------------------------------------------------
# Optimized-HLO text: instructions, shapes, bytes


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: ``name = shape opcode(operands), attributes``."""

    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    root: bool = False


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index + 1
    return len(text)


def parse_instruction(line: str) -> Instruction | None:
    """The instruction on one line of HLO text, or ``None`` for any other line."""
    match = re.match(r"\s*(ROOT )?%([\w.\-]+) = ", line)
    if not match:
        return None
    rest = line[match.end():]
    shape_end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
    opcode_end = rest.index("(")
    operands_end = _balanced(rest, opcode_end)
    operands = re.findall(r"%([\w.\-]+)", rest[opcode_end:operands_end])
    return Instruction(match.group(2), shape, rest[:opcode_end], tuple(operands),
                       rest[operands_end:], root=bool(match.group(1)))


def parse_computations(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Every computation's instructions, by name, and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if header and " = " not in line.split("{")[0]:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            instruction = parse_instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    return computations, entry


def array_bytes(shape: str, memory_space: int | None = None, padded: bool = False) -> int:
    """Bytes of the arrays in an HLO shape (a tuple counts its elements).

    Args:
      shape: an HLO shape such as ``bf16[8,128]{1,0:T(8,128)(2,1)S(1)}`` or a tuple of them.
      memory_space: count only arrays in this memory space (``S(n)`` in the layout; none
        written means 0, HBM); ``None`` counts all.
      padded: round the minor dimensions up to the layout's first tile, as stored.
    """
    total = 0
    for dtype, dims_text, layout in re.findall(r"(\w+)\[([\d,]*)\](\{[^}]*\})?", shape):
        space = re.search(r"S\((\d+)\)", layout or "")
        if memory_space is not None and (int(space.group(1)) if space else 0) != memory_space:
            continue
        dims = [int(d) for d in dims_text.split(",") if d]
        if padded and layout and ":" in layout:
            dims = _tiled_dims(dims, layout)
        total += math.prod(dims) * ITEMSIZE.get(dtype, 4)
    return total


def _tiled_dims(dims: list[int], layout: str) -> list[int]:
    """``dims`` in physical (major-to-minor) order, the minor ones padded to the first tile."""
    minor_to_major = [int(d) for d in layout[1:].split(":")[0].split(",") if d]
    physical = [dims[d] for d in reversed(minor_to_major)] if minor_to_major else dims
    tile = re.search(r"T\(([\d,]+)\)", layout)
    if tile is None or not physical:
        return physical
    sizes = [int(t) for t in tile.group(1).split(",")]
    for offset, size in enumerate(reversed(sizes), start=1):
        if offset <= len(physical):
            physical[-offset] = -(-physical[-offset] // size) * size
    return physical


@dataclasses.dataclass
class GraphCost:
    """What the work instructions of a compiled graph add up to."""

    kernels: int = 0
    estimated_cycles: int = 0
    hbm_bytes: int = 0
    opcodes: Counter = dataclasses.field(default_factory=Counter)
    # of the above, what runs inside the costliest branch of each conditional (lax.cond)
    conditional_kernels: int = 0
    conditional_cycles: int = 0
    conditional_bytes: int = 0


def graph_cost(hlo_text: str) -> GraphCost:
    """Kernels, estimated cycles and HBM bytes of the entry computation; control flow is
    followed into the computations it calls (a conditional: its costliest branch; a while
    loop: its body once per known trip, else once)."""
    computations, entry = parse_computations(hlo_text)
    return _computation_cost(computations, entry)


def entry_io_bytes(hlo_text: str) -> int:
    """Bytes of the entry computation's parameters and result as the target stores them
    (tiled, padded): the least a graph can move, one read and one write of each."""
    computations, entry = parse_computations(hlo_text)
    return sum(
        array_bytes(i.shape, padded=True)
        for i in computations[entry]
        if i.opcode == "parameter" or i.root
    )


def _computation_cost(computations: dict[str, list[Instruction]], name: str) -> GraphCost:
    cost = GraphCost()
    shapes = {i.name: i.shape for i in computations[name]}
    for instruction in computations[name]:
        if _does_no_work(instruction):
            continue
        if instruction.opcode in CONTROL_FLOW:
            _add_control_flow(cost, computations, instruction)
            continue
        cost.kernels += instruction.opcode not in ASYNC_COPIES
        cost.opcodes[_kind(instruction)] += 1
        cycles = re.search(r'"estimated_cycles":"(\d+)"', instruction.attributes)
        cost.estimated_cycles += int(cycles.group(1)) if cycles else 0
        cost.hbm_bytes += hbm_bytes(instruction, shapes)
    return cost


def called_computations(instruction: Instruction) -> list[str]:
    """Names of the computations a conditional, while or call instruction runs."""
    called = re.findall(
        r"(?:branch_computations=\{|true_computation=|false_computation=|body=|to_apply=)"
        r"([^,}]*(?:, %[\w.\-]+)*)",
        instruction.attributes,
    )
    return [n for group in called for n in re.findall(r"%?([\w.\-]+)", group)]


def _root_outputs(instructions: list[Instruction]) -> set[tuple[str, int | None]]:
    """``(instruction, tuple index or None)`` pairs whose arrays the computation returns,
    followed back through tuples, get-tuple-elements and bitcasts."""
    by_name = {i.name: i for i in instructions}
    outputs: set[tuple[str, int | None]] = set()
    pending = [(i.name, None) for i in instructions if i.root]
    while pending:
        name, index = pending.pop()
        instruction = by_name.get(name)
        if instruction is None:
            continue
        if instruction.opcode == "tuple":
            operands = instruction.operands
            operands = operands if index is None else operands[index:index + 1]
            pending += [(o, None) for o in operands]
        elif instruction.opcode == "get-tuple-element":
            element = re.search(r"index=(\d+)", instruction.attributes)
            pending.append((instruction.operands[0], int(element.group(1)) if element else None))
        elif instruction.opcode == "bitcast":
            pending.append((instruction.operands[0], index))
        else:
            outputs.add((name, index))
    return outputs


def _result_arrays(shape: str) -> list[str]:
    """The arrays of an HLO result shape, in tuple order (one for a plain array)."""
    return re.findall(r"\w+\[[\d,]*\]", shape)


def x_sized_intermediates(hlo_text: str, x_elements: int) -> list[dict[str, Any]]:
    """Work instructions that write an array of at least ``x_elements`` elements that the
    computation does not return: intermediates the size of the input, each a full extra
    pass of memory traffic (the outputs y and dx are the passes every graph must write).
    Computations that control flow calls are checked the same way, each against its own
    result."""
    computations, entry = parse_computations(hlo_text)
    found: list[dict[str, Any]] = []
    _check_intermediates(computations, entry, x_elements, found, set())
    return found


def x_sized_passes(hlo_text: str, x_elements: int) -> int:
    """Passes over x-sized arrays: how many arrays of at least ``x_elements`` elements the
    kernels read or write (a conditional: its costliest branch), to set beside the pass
    floor (``sweep.FLOOR_PASSES``). Dtypes are not weighed: a float32 pass over a
    bfloat16 input counts one, as a bfloat16 one does."""
    computations, entry = parse_computations(hlo_text)
    return _passes(computations, entry, x_elements)


def _elements(array: str) -> int:
    """Elements of one ``dtype[dims]`` array."""
    return math.prod(int(d) for d in re.findall(r"\d+", array.split("[", 1)[1]))


def _passes(computations: dict[str, list[Instruction]], name: str, x_elements: int) -> int:
    instructions = computations.get(name, [])
    shapes = {i.name: i.shape for i in instructions}
    total = 0
    for instruction in instructions:
        if _does_no_work(instruction) or instruction.opcode in ("tuple", "bitcast"):
            continue
        if instruction.opcode in CONTROL_FLOW:
            total += max((_passes(computations, c, x_elements)
                          for c in called_computations(instruction)), default=0)
            continue
        arrays = _result_arrays(instruction.shape)
        arrays += [a for o in instruction.operands for a in _result_arrays(shapes.get(o, ""))]
        total += sum(_elements(a) >= x_elements for a in arrays)
    return total


def _check_intermediates(computations: dict[str, list[Instruction]], name: str,
                         x_elements: int, found: list[dict[str, Any]], seen: set[str]) -> None:
    if name in seen or name not in computations:
        return
    seen.add(name)
    instructions = computations[name]
    outputs = _root_outputs(instructions)
    for instruction in instructions:
        if _does_no_work(instruction) or instruction.opcode in ("tuple", "bitcast"):
            continue
        if instruction.opcode in CONTROL_FLOW:
            for called in called_computations(instruction):
                _check_intermediates(computations, called, x_elements, found, seen)
        arrays = _result_arrays(instruction.shape)
        tupled = instruction.shape.startswith("(")
        for index, array in enumerate(arrays):
            if _elements(array) < x_elements:
                continue
            if (instruction.name, index if tupled else None) in outputs or (
                    instruction.name, None) in outputs:
                continue
            element = f"{{{index}}}" if tupled else ""
            found.append({"computation": name, "instruction": instruction.name + element,
                          "opcode": instruction.opcode, "array": array,
                          "bytes": array_bytes(array)})


def _does_no_work(instruction: Instruction) -> bool:
    """Bookkeeping: parameters, tuples, bitcasts, the ``-done`` halves of asynchronous
    pairs (the ``-start`` counts), TPU's in-place ``ConcatBitcast``."""
    return (
        instruction.opcode in NO_WORK
        or instruction.opcode.endswith("-done")
        or 'custom_call_target="ConcatBitcast"' in instruction.attributes
    )


def hbm_bytes(instruction: Instruction, shapes: dict[str, str]) -> int:
    """Bytes ``instruction`` reads from and writes to memory space 0 (HBM), as stored.

    An asynchronous copy or slice moves its destination's bytes, counted once for each of
    source and destination that lies in HBM; any other instruction reads its operands and
    writes its result.

    Args:
      instruction: an instruction that does work.
      shapes: the shapes of the instructions of its computation, by name.
    """
    if instruction.opcode in ASYNC_COPIES:
        arrays = re.findall(ARRAY, instruction.shape)
        # copy-start: (destination, source, context); slice-start: ((source), destination, ...)
        destination = arrays[0] if instruction.opcode == "copy-start" else arrays[1]
        source = shapes.get(instruction.operands[0], "") if instruction.operands else ""
        moved = array_bytes(destination, padded=True)
        in_hbm = [array_bytes(a, memory_space=0) > 0 for a in (destination, source)]
        return moved * sum(in_hbm)
    total = array_bytes(instruction.shape, memory_space=0, padded=True)
    return total + sum(
        array_bytes(shapes.get(o, ""), memory_space=0, padded=True) for o in instruction.operands
    )


def _add_control_flow(
    cost: GraphCost, computations: dict[str, list[Instruction]], instruction: Instruction
) -> None:
    """Adds the cost of what a conditional, while or call instruction runs."""
    cost.opcodes[instruction.opcode] += 1
    names = called_computations(instruction)
    parts = [_computation_cost(computations, n) for n in names if n in computations]
    if not parts:
        return
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
    if instruction.opcode == "conditional":
        chosen, repeat = max(parts, key=lambda p: (p.estimated_cycles, p.hbm_bytes)), 1
    else:
        chosen, repeat = parts[0], int(trips.group(1)) if trips else 1
    cost.kernels += repeat * chosen.kernels
    cost.estimated_cycles += repeat * chosen.estimated_cycles
    cost.hbm_bytes += repeat * chosen.hbm_bytes
    in_branch = instruction.opcode == "conditional"
    cost.conditional_kernels += repeat * (chosen.kernels if in_branch else chosen.conditional_kernels)
    cost.conditional_cycles += repeat * (
        chosen.estimated_cycles if in_branch else chosen.conditional_cycles)
    cost.conditional_bytes += repeat * (chosen.hbm_bytes if in_branch else chosen.conditional_bytes)
    for kind, count in chosen.opcodes.items():
        cost.opcodes[kind] += repeat * count


def _kind(instruction: Instruction) -> str:
    """``fusion`` as ``fusion:kLoop`` etc.; a custom call with its target; else the opcode."""
    if instruction.opcode == "fusion":
        kind = re.search(r"kind=(\w+)", instruction.attributes)
        return f"fusion:{kind.group(1)}" if kind else "fusion"
    if instruction.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', instruction.attributes)
        return f"custom-call:{target.group(1)}" if target else "custom-call"
    return instruction.opcode


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective the optimized HLO runs (an async start/done pair once)."""
    computations, _ = parse_computations(hlo_text)
    opcodes = Counter(i.opcode.removesuffix("-start") for c in computations.values() for i in c)
    return {kind: opcodes[kind] for kind in COLLECTIVES}


def launched_kernels(thunk_text: str) -> int:
    """Kernel-like thunks (kernels, library calls, copies, memsets) of a GPU executable."""
    containers = {"kSequential", "kConditional", "kWhile", "kCommandBuffer", "kDynamicSlice"}
    kinds = re.findall(r"^\s*\d+: (k\w+)", thunk_text, flags=re.MULTILINE)
    return sum(1 for kind in kinds if kind not in containers)


# --------------------------------------------------------------------------------------
# Worker: runs inside an AOT venv, compiles the cases for one family's targets


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer × shape × dtype × pass (× parameter dtype) of ``run.py --quick`` or of
    the whole sweep (``sweep.py``)."""

    layer: str
    shape: tuple[int, ...]
    dtype: str
    pass_name: str
    param_dtype: str = "float32"

    @property
    def label(self) -> str:
        params = f" ({self.param_dtype} params)" if self.param_dtype != "float32" else ""
        return (f"{self.layer} {'x'.join(map(str, self.shape))} {self.dtype}{params} "
                f"{self.pass_name}")


def import_source(source: Path) -> Any:
    """``jaxnorm`` imported from the checkout ``source`` (put first on ``sys.path``), then
    ``benchmarks/run.py`` beside this script, which reuses that ``jaxnorm``."""
    sys.path.insert(0, str(source))
    import jaxnorm
    import jaxnorm.linen

    if not Path(jaxnorm.__file__).resolve().is_relative_to(source.resolve()):
        raise RuntimeError(f"--source {source}: jaxnorm came from {jaxnorm.__file__}")
    spec = importlib.util.spec_from_file_location("benchmarks_run", HERE / "run.py")
    run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = run  # dataclasses look their module up there
    spec.loader.exec_module(run)
    return run


def quick_cases(run: Any, substring: str | None, whole_sweep: bool = False) -> list[Case]:
    """The ``--quick`` cases of run.py (or, with ``whole_sweep``, every case of the sweep at
    full size), forward and forward+backward, filtered by label."""
    if whole_sweep:
        pairs = [(c.layer, c.shape, d, c.param_dtype_for(d))
                 for c, d in run.sweep.with_dtypes(run.sweep.SWEEP)]
    else:
        pairs = [(layer, shape, d, "float32") for layer, shape in run.QUICK_CASES
                 for d in run.DTYPES]
    cases = [
        Case(layer, tuple(shape), dtype, pass_name, param_dtype)
        for layer, shape, dtype, param_dtype in pairs
        for pass_name in ("forward", "forward+backward")
    ]
    return [c for c in cases if substring is None or substring in c.label]


def jaxnorm_twin(flax_module: Any) -> Any:
    """The ``jaxnorm.linen`` module of the same class name, given every argument the Flax
    module was given (those not left at Flax's default): each library keeps its defaults."""
    import jaxnorm.linen

    kwargs = {}
    for field in dataclasses.fields(flax_module):
        if field.name in ("parent", "name") or not field.init:
            continue
        value = getattr(flax_module, field.name)
        default = field.default
        if default is dataclasses.MISSING or (value is not default and value != default):
            kwargs[field.name] = value
    return getattr(jaxnorm.linen, type(flax_module).__name__)(**kwargs)


def case_function(module: Any, variables: Any, pass_name: str) -> Callable[..., Any]:
    """``x, variables -> (y, state)`` or ``x, variables, dy -> (y, dx, dparams, state)``:
    the forward pass, or it and its vector-Jacobian product with respect to ``x`` and the
    ``params`` (the other collections, e.g. ``batch_stats``, are updated, not differentiated)."""
    mutable = [name for name in variables if name != "params"]

    def forward(x: Any, params: Any, rest: Any) -> tuple[Any, Any]:
        if not mutable:
            return module.apply({"params": params, **rest}, x), None
        return module.apply({"params": params, **rest}, x, mutable=mutable)

    def forward_only(x: Any, variables: Any) -> Any:
        rest = {k: v for k, v in variables.items() if k != "params"}
        return forward(x, variables["params"], rest)

    def forward_backward(x: Any, variables: Any, dy: Any) -> Any:
        import jax

        rest = {k: v for k, v in variables.items() if k != "params"}
        y, pullback, state = jax.vjp(
            lambda x_, p_: forward(x_, p_, rest), x, variables["params"], has_aux=True
        )
        dx, dparams = pullback(dy)
        return y, dx, dparams, state

    return forward_only if pass_name == "forward" else forward_backward


def logical_bytes(tree: Any) -> int:
    """Bytes of every array in a pytree of shapes, at their logical (unpadded) sizes."""
    import jax

    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Compilation:
    """Where and how one target compiles: its device mesh, and the dump folders."""

    target: Target
    mesh: Any
    xla_dump: Path | None
    keep_hlo: Path | None


def target_mesh(target: Target, h200_config: Path, axis: str = "x") -> Any:
    """A one-device mesh of the target's topology (no hardware needed)."""
    from jax.experimental import topologies

    if target.family == "gpu":
        topology = topologies.get_topology_desc(
            target.name, platform="cuda", target_config=h200_config.read_text(),
            topology="1x1x1",
        )
    else:
        topology = topologies.get_topology_desc(
            topology_name=f"{target.name}:1x1", platform="tpu", chips_per_host_bounds=(1, 1, 1)
        )
    return topologies.make_mesh(topology, (1,), (axis,))


def gpu_bytes_accessed(compiled: Any) -> float:
    """XLA's generic cost analysis ("bytes accessed") of a compile-only GPU executable,
    whose own ``cost_analysis()`` is not implemented."""
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    module = compiled._executable.xla_extension_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
    return float(cost["bytes accessed"])


def tpu_cost(compiled: Any) -> dict[str, float]:
    """``compiled.cost_analysis()`` (a dict, or a one-element list in older versions)."""
    cost = compiled.cost_analysis()
    return dict(cost[0] if isinstance(cost, list) else cost)


def thunk_file(xla_dump: Path, name: str) -> Path | None:
    """The thunk sequence XLA dumped for the jitted function ``name``."""
    found = sorted(glob.glob(str(xla_dump / f"module_*.jit_{name}.thunk_sequence.txt")))
    return Path(found[-1]) if found else None


def compile_case(run: Any, where: Compilation, case: Case, impl: str, index: int) -> dict:
    """Compiles one case for one target with jaxnorm's or Flax's module; its record."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    dtype = run.DTYPES[case.dtype]
    flax_module = run.LAYERS[case.layer].flax_module(dtype).clone(
        param_dtype=run.DTYPES[case.param_dtype])
    module = flax_module if impl == "flax" else jaxnorm_twin(flax_module)
    x = jax.ShapeDtypeStruct(case.shape, dtype)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    logical = [x, variables] + ([x] if case.pass_name == "forward+backward" else [])
    replicated = NamedSharding(where.mesh, PartitionSpec())
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                         logical)
    function = case_function(module, variables, case.pass_name)
    name = f"{where.target.name}_{index:02d}_{impl}"
    function.__name__ = function.__qualname__ = name
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*specs).compile()
    hlo = compiled.as_text()
    cost = graph_cost(hlo)
    record = {
        "target": where.target.name, "case": case.label, "layer": case.layer,
        "shape": list(case.shape), "dtype": case.dtype, "param_dtype": case.param_dtype,
        "pass": case.pass_name, "impl": impl,
        "kernels": cost.kernels, "opcodes": dict(sorted(cost.opcodes.items())),
        "cond_kernels": cost.conditional_kernels, "cond_bytes": cost.conditional_bytes,
        "ideal_bytes": logical_bytes(logical) + logical_bytes(jax.eval_shape(function, *logical)),
        "compile_s": round(time.perf_counter() - start, 2),
    }
    thunks = None
    if where.target.family == "gpu":
        record["bytes"] = gpu_bytes_accessed(compiled)
        record["x_sized_writes"] = x_sized_intermediates(hlo, math.prod(case.shape))
        record["x_passes"] = x_sized_passes(hlo, math.prod(case.shape))
        record["floor_passes"] = run.sweep.FLOOR_PASSES[case.layer][case.pass_name]
        thunks = thunk_file(where.xla_dump, name) if where.xla_dump else None
        record["launched"] = launched_kernels(thunks.read_text()) if thunks else None
    else:
        record["bytes"] = tpu_cost(compiled).get("bytes accessed")
        record["estimated_cycles"] = cost.estimated_cycles
        record["cond_cycles"] = cost.conditional_cycles
        record["ideal_stored_bytes"] = entry_io_bytes(hlo)
        record["hbm_bytes"] = cost.hbm_bytes
    if where.keep_hlo is not None:
        slug = re.sub(r"[^\w.]+", "_", f"{where.target.name} {case.label} {impl}")
        (where.keep_hlo / f"{slug}.hlo.txt").write_text(hlo)
        if thunks is not None:
            (where.keep_hlo / f"{slug}.thunks.txt").write_text(thunks.read_text())
    return record


# --------------------------------------------------------------------------------------
# Collectives of a data-parallel training step

CONV_LAYERS = 8


def conv_net(norm: Any) -> Any:
    """``CONV_LAYERS`` × (3×3 conv -> ``norm(axis_name="d")`` in training mode -> relu)."""
    import flax.linen as nn

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            for _ in range(CONV_LAYERS):
                x = nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)
                x = norm(use_running_average=False, axis_name="d")(x)
                x = nn.relu(x)
            return x

    return ConvNet()


def training_step_collectives(norm: Any, mesh: Any, with_backward: bool) -> dict[str, int]:
    """Collectives in the optimized HLO of one data-parallel step of :func:`conv_net`
    under ``shard_map`` over ``mesh``'s axis ``d``: the forward pass with its batch-statistics
    update, and (``with_backward``) the gradients with respect to the parameters,
    ``pmean``-ed over ``d``. Global batch 8 per device, 16×16×64, float32."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    model = conv_net(norm)
    devices = mesh.devices.size
    images = jax.ShapeDtypeStruct((8 * devices, 16, 16, 64), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)

    def step(variables: Any, images: Any) -> Any:
        def loss(params: Any) -> tuple[Any, Any]:
            y, updates = model.apply({**variables, "params": params}, images,
                                     mutable=["batch_stats"])
            return jnp.mean(jnp.square(y)), updates

        if not with_backward:
            return loss(variables["params"])
        grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
        return jax.lax.pmean(grads, "d"), updates

    replicated, batch = PartitionSpec(), PartitionSpec("d")
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(replicated, batch),
                            out_specs=(replicated, replicated), check_vma=False)
    specs = (
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                    sharding=NamedSharding(mesh, replicated)),
                     variables),
        jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=NamedSharding(mesh, batch)),
    )
    return count_collectives(jax.jit(sharded).lower(*specs).compile().as_text())


def collectives_record(topology_name: str = "v5e:2x2") -> list[dict[str, Any]]:
    """All-reduces (and other collectives) of the training step, jaxnorm vs Flax BatchNorm."""
    import flax.linen as nn
    from jax.experimental import topologies

    import jaxnorm.linen

    topology = topologies.get_topology_desc(
        topology_name=topology_name, platform="tpu", chips_per_host_bounds=(2, 2, 1)
    )
    mesh = topologies.make_mesh(topology, (len(topology.devices),), ("d",))
    records = []
    for impl, norm in (("jaxnorm", jaxnorm.linen.BatchNorm), ("flax", nn.BatchNorm)):
        forward = training_step_collectives(norm, mesh, with_backward=False)
        step = training_step_collectives(norm, mesh, with_backward=True)
        records.append({
            "impl": impl, "topology": topology_name, "layers": CONV_LAYERS,
            "forward": forward, "step": step,
            "all_reduce_per_layer": round(step["all-reduce"] / CONV_LAYERS, 3),
        })
        print(f"collectives {impl:8s} forward {forward} step {step}", flush=True)
    return records


def worker(args: argparse.Namespace) -> None:
    """Compiles every selected case for the targets of one family; writes the records."""
    run = import_source(Path(args.source))
    import flax
    import jax

    records: list[dict[str, Any]] = []
    xla_dump = Path(args.xla_dump) if args.xla_dump else None
    keep = Path(args.dump) if args.dump else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    cases = quick_cases(run, args.case, args.sweep)
    for target_name in args.worker_targets:
        target = TARGETS[target_name]
        where = Compilation(target, target_mesh(target, Path(args.h200_config)), xla_dump, keep)
        for index, case in enumerate(cases):
            for impl in ("jaxnorm", "flax"):
                records.append(compile_case(run, where, case, impl, index))
                print(f"{target_name:5s} {case.label:48s} {impl:8s} kernels "
                      f"{records[-1]['kernels']:3d} bytes {records[-1]['bytes']:.4g}", flush=True)
    collectives = collectives_record() if args.collectives else []
    Path(args.worker_out).write_text(json.dumps({
        "jax": jax.__version__, "flax": flax.__version__, "records": records,
        "collectives": collectives,
    }))


# --------------------------------------------------------------------------------------
# Driver: one worker per venv, then ratios, tables and JSON

# Per family: the measures compared jaxnorm/Flax, and the one compared with the ideal.
MEASURES = {"gpu": ("bytes", "kernels", "launched"),
            "tpu": ("estimated_cycles", "hbm_bytes", "bytes", "kernels")}
TRAFFIC = {"gpu": "bytes", "tpu": "hbm_bytes"}
# Measures also compared on the common path: without what lax.cond branches would add (the
# branches counted are the costliest; a well-conditioned input may take the empty one).
COMMON_PATH = {"gpu": (("bytes", "cond_bytes"), ("kernels", "cond_kernels")),
               "tpu": (("estimated_cycles", "cond_cycles"), ("hbm_bytes", "cond_bytes"))}
# The ideal: logical sizes on GPU; on TPU as stored (tiled), since HBM bytes are counted so.
IDEAL = {"gpu": "ideal_bytes", "tpu": "ideal_stored_bytes"}
MIB = 2.0**20


def family_of(target: str) -> str:
    """``gpu`` or ``tpu``: which venv compiles ``target``."""
    return TARGETS[target].family


def run_worker(family: str, targets: list[str], args: argparse.Namespace,
               collectives: bool) -> dict:
    """Runs this script as a worker in the family's venv; its parsed JSON output."""
    python = args.gpu_python if family == "gpu" else args.tpu_python
    if not Path(python).exists():
        raise SystemExit(f"--{family}-python {python} does not exist: create the venv first "
                         f"(see this script's docstring)")
    with tempfile.TemporaryDirectory(prefix=f"aot-{family}-") as scratch:
        out, dump = Path(scratch) / "out.json", Path(scratch) / "xla"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1",
               "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""}
        if family == "gpu":
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
        command = [python, str(Path(__file__).resolve()), "--worker", family,
                   "--worker-targets", *targets, "--worker-out", str(out),
                   "--source", str(args.source), "--h200-config", str(args.h200_config),
                   "--xla-dump", str(dump) if family == "gpu" else ""]
        command += ["--case", args.case] if args.case else []
        command += ["--sweep"] if args.sweep else []
        command += ["--dump", str(args.dump)] if args.dump else []
        command += ["--collectives"] if collectives else []
        log = Path(scratch) / "stderr.txt"
        with log.open("w") as stderr:
            done = subprocess.run(command, env=env, stderr=stderr, check=False)
        if done.returncode != 0:
            sys.stderr.write(log.read_text()[-6000:])
            raise SystemExit(f"{family} worker failed ({done.returncode})")
        return json.loads(out.read_text())


def pair_records(records: Iterable[dict]) -> list[dict]:
    """One row per target and case: both libraries' measures and the ratios."""
    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        pairs.setdefault((record["target"], record["case"]), {})[record["impl"]] = record
    rows = []
    for (target, _), pair in pairs.items():
        ours, theirs = pair["jaxnorm"], pair["flax"]
        family = family_of(target)
        row = {key: ours[key] for key in ("target", "case", "layer", "shape", "dtype", "pass",
                                          "ideal_bytes")}
        row["param_dtype"] = ours.get("param_dtype", "float32")
        for measure in MEASURES[family]:
            row[f"jaxnorm_{measure}"], row[f"flax_{measure}"] = ours[measure], theirs[measure]
            if ours[measure] and theirs[measure]:
                row[f"ratio_{measure}"] = round(ours[measure] / theirs[measure], 4)
        if "x_sized_writes" in ours and "x_sized_writes" in theirs:
            row.update(structure(ours, theirs))
        for measure, part in COMMON_PATH[family]:
            common = [r[measure] - r.get(part, 0) for r in (ours, theirs)]
            if all(common):
                row[f"ratio_{measure}_common"] = round(common[0] / common[1], 4)
        ideal = IDEAL[family]
        row["ideal_stored_bytes"] = ours.get("ideal_stored_bytes")
        for impl, record in (("jaxnorm", ours), ("flax", theirs)):
            row[f"{impl}_over_ideal"] = round(record[TRAFFIC[family]] / record[ideal], 4)
            for key in ("cond_kernels", "cond_bytes", "cond_cycles", "opcodes"):
                if key in record:
                    row[f"{impl}_{key}"] = record[key]
        rows.append(row)
    return rows


def structure(ours: dict, theirs: dict) -> dict[str, Any]:
    """The structural checks of one case: the x-sized intermediates each library writes,
    and whether jaxnorm writes more of them than Flax, or launches more kernels than Flax
    without moving fewer bytes (a kernel more must pay for itself in bytes)."""
    names = {impl: [f"{w['instruction']} {w['array']}" for w in record["x_sized_writes"]]
             for impl, record in (("jaxnorm", ours), ("flax", theirs))}
    return {
        "jaxnorm_x_sized": names["jaxnorm"], "flax_x_sized": names["flax"],
        "extra_x_sized": len(names["jaxnorm"]) - len(names["flax"]),
        "jaxnorm_x_passes": ours.get("x_passes"), "flax_x_passes": theirs.get("x_passes"),
        "floor_passes": ours.get("floor_passes"),
        "unpaid_kernels": ours["kernels"] > theirs["kernels"] and ours["bytes"] >= theirs["bytes"],
    }


def structure_table(rows: Sequence[dict]) -> str:
    """Per case: the x-sized intermediates of each library and the kernel counts, with the
    cases that fail a check first."""
    def failing(row: dict) -> bool:
        return row["extra_x_sized"] > 0 or row["unpaid_kernels"]

    ordered = sorted(rows, key=lambda r: not failing(r))
    header = ["case", "x-sized intermediates jaxnorm", "Flax", "kernels j/F", "MiB j/F",
              "x passes j/F/floor", "check"]
    return markdown_table(header, (
        [short_case(r), "<br>".join(r["jaxnorm_x_sized"]) or "none",
         "<br>".join(r["flax_x_sized"]) or "none", f"{r['jaxnorm_kernels']}/{r['flax_kernels']}",
         f"{r['jaxnorm_bytes'] / MIB:.1f}/{r['flax_bytes'] / MIB:.1f}",
         f"{r['jaxnorm_x_passes']}/{r['flax_x_passes']}/{r['floor_passes']}",
         ", ".join(filter(None, [
             f"{r['extra_x_sized']} more x-sized than Flax" if r["extra_x_sized"] > 0 else "",
             "kernel(s) more, bytes not fewer" if r["unpaid_kernels"] else ""])) or "ok"]
        for r in ordered
    ))


def structure_summary(rows: Sequence[dict]) -> str:
    """One sentence: how many cases fail each structural check."""
    extra = sum(r["extra_x_sized"] > 0 for r in rows)
    unpaid = sum(r["unpaid_kernels"] for r in rows)
    return (f"{len(rows)} cases: {extra} write more x-sized intermediates than Flax, "
            f"{unpaid} launch more kernels than Flax without moving fewer bytes.")


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """Per target and measure: geometric mean and worst (largest) ratio, with its case."""
    summary: dict[str, dict] = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        entry: dict[str, Any] = {}
        family = family_of(target)
        keys = [f"ratio_{m}" for m in MEASURES[family]]
        keys += [f"ratio_{m}_common" for m, _ in COMMON_PATH[family]]
        for key in [*keys, "jaxnorm_over_ideal", "flax_over_ideal"]:
            having = [r for r in mine if r.get(key)]
            if not having:
                continue
            worst = max(having, key=lambda r: r[key])
            entry[key] = {"geomean": round(geometric_mean([r[key] for r in having]), 4),
                          "worst": worst[key], "worst_case": worst["case"]}
        summary[target] = entry
    return summary


def short_case(row: dict) -> str:
    dtype = {"float32": "f32", "bfloat16": "bf16"}.get(row["dtype"], row["dtype"])
    step = {"forward": "fwd", "forward+backward": "fwd+bwd"}.get(row["pass"], row["pass"])
    params = row.get("param_dtype", "float32")
    params = "" if params == "float32" else f" ({ {'bfloat16': 'bf16'}.get(params, params)} params)"
    return f"{row['layer']} {'x'.join(map(str, row['shape']))} {dtype}{params} {step}"


def markdown_table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(rows)


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if row.get(key) else "–"


def _with_cond(row: dict, impl: str, measure: str, scale: float = 1.0, digits: int = 0) -> str:
    """A measure, followed by the part inside lax.cond branches when there is one."""
    value = row[f"{impl}_{measure}"] / scale
    part = {"kernels": "cond_kernels", "bytes": "cond_bytes", "hbm_bytes": "cond_bytes",
            "estimated_cycles": "cond_cycles"}[measure]
    inside = row.get(f"{impl}_{part}", 0) / scale
    text = f"{value:.{digits}f}"
    return f"{text} ({inside:.{digits}f})" if inside else text


def gpu_table(rows: Sequence[dict]) -> str:
    """Kernels and bytes accessed per case on a GPU target."""
    header = ["case", "kernels jaxnorm (cond)", "Flax", "launched j/F", "MiB jaxnorm (cond)",
              "Flax", "MiB ideal", "j/F", "j/ideal", "F/ideal"]
    return markdown_table(header, (
        [short_case(r), _with_cond(r, "jaxnorm", "kernels"), _with_cond(r, "flax", "kernels"),
         f"{r['jaxnorm_launched']}/{r['flax_launched']}",
         _with_cond(r, "jaxnorm", "bytes", MIB, 1), _with_cond(r, "flax", "bytes", MIB, 1),
         f"{r['ideal_bytes'] / MIB:.1f}", _ratio(r, "ratio_bytes"),
         _ratio(r, "jaxnorm_over_ideal"), _ratio(r, "flax_over_ideal")]
        for r in rows
    ))


def tpu_table(rows: Sequence[dict]) -> str:
    """Kernels, estimated cycles and HBM bytes per case on a TPU target."""
    header = ["case", "kernels jaxnorm (cond)", "Flax", "kcycles jaxnorm (cond)", "Flax", "j/F",
              "HBM MiB jaxnorm (cond)", "Flax", "MiB ideal (stored)", "j/F",
              "j/ideal", "F/ideal"]
    return markdown_table(header, (
        [short_case(r), _with_cond(r, "jaxnorm", "kernels"), _with_cond(r, "flax", "kernels"),
         _with_cond(r, "jaxnorm", "estimated_cycles", 1e3),
         _with_cond(r, "flax", "estimated_cycles", 1e3), _ratio(r, "ratio_estimated_cycles"),
         _with_cond(r, "jaxnorm", "hbm_bytes", MIB, 1), _with_cond(r, "flax", "hbm_bytes", MIB, 1),
         f"{r['ideal_stored_bytes'] / MIB:.1f}", _ratio(r, "ratio_hbm_bytes"),
         _ratio(r, "jaxnorm_over_ideal"), _ratio(r, "flax_over_ideal")]
        for r in rows
    ))


def summary_table(summary: dict[str, dict]) -> str:
    """Geometric mean and worst ratio per target and measure."""
    lines = []
    for target, entry in summary.items():
        for key, value in entry.items():
            lines.append([target, key.removeprefix("ratio_"), f"{value['geomean']:.3f}",
                          f"{value['worst']:.2f}", value["worst_case"]])
    return markdown_table(["target", "ratio", "geomean", "worst", "worst case"], lines)


def collectives_table(records: Sequence[dict]) -> str:
    """All-reduces of the data-parallel step per BatchNorm class."""
    return markdown_table(
        ["BatchNorm", "topology", "all-reduce fwd", "all-reduce step", "per layer (step)",
         "other collectives (step)"],
        ([r["impl"], r["topology"], str(r["forward"]["all-reduce"]),
          str(r["step"]["all-reduce"]), f"{r['all_reduce_per_layer']:.2f}",
          ", ".join(f"{k} {v}" for k, v in r["step"].items() if v and k != "all-reduce")
          or "none"] for r in records),
    )


def report(result: dict) -> str:
    """The Markdown tables of a result."""
    parts = ["Summary (jaxnorm/Flax; below 1: jaxnorm better)\n\n"
             + summary_table(result["summary"])]
    for target in dict.fromkeys(r["target"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["target"] == target]
        table = gpu_table(rows) if family_of(target) == "gpu" else tpu_table(rows)
        parts.append(f"{TARGETS[target].description}\n\n{table}")
        checked = [r for r in rows if "extra_x_sized" in r]
        if checked:
            parts.append(f"Structural checks, {TARGETS[target].description}: "
                         f"{structure_summary(checked)}\n\n{structure_table(checked)}")
    if result["collectives"]:
        parts.append("Data-parallel step, 8 × (conv -> BatchNorm(axis_name='d') -> relu), "
                     f"grads pmean-ed\n\n{collectives_table(result['collectives'])}")
    return "\n\n".join(parts)


def source_revision(source: Path) -> str:
    """The source checkout's commit (``+dirty`` with uncommitted changes), if a git tree."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(source), *command], capture_output=True,
                              text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "jaxnorm")
    return f"{commit}{'+dirty' if dirty else ''}" if commit else "unknown"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--case", default=None, metavar="SUBSTRING",
                        help='only cases whose label contains it, e.g. "LayerNorm 8192x1024 '
                             'bfloat16 forward+backward"')
    parser.add_argument("--sweep", action="store_true",
                        help="every case of the shared sweep (sweep.py) at full size, instead "
                             "of run.py's --quick subset")
    parser.add_argument("--source", type=Path, default=REPO,
                        help="the jaxnorm checkout to measure (default: this repository)")
    parser.add_argument("--revision", default=None,
                        help="what to record as the source's revision (default: its git HEAD)")
    parser.add_argument("--dump", type=Path, default=None, metavar="DIR",
                        help="keep the optimized HLO of every case and library there")
    parser.add_argument("--json", nargs="?", const=str(HERE / "accelerators.json"),
                        default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH",
                        help="also write the tables to this Markdown file")
    parser.add_argument("--no-collectives", action="store_true",
                        help="skip the data-parallel step (compiled with v5e by default)")
    parser.add_argument("--gpu-python", default=DEFAULT_PYTHON["gpu"])
    parser.add_argument("--tpu-python", default=DEFAULT_PYTHON["tpu"])
    parser.add_argument("--h200-config", type=Path, default=H200_TARGET_CONFIG,
                        help="the H200 GpuTargetConfig text proto")
    for hidden in ("--worker", "--worker-out", "--xla-dump"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-targets", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--collectives", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.source.joinpath("jaxnorm", "__init__.py").exists():
        parser.error(f"--source {args.source}: no jaxnorm/__init__.py there")
    return args


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Runs the workers, prints the tables; writes ``--json`` and ``--markdown``."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return None
    targets = list(TARGETS) if args.target == "all" else [args.target]
    collectives = "v5e" in targets and not args.no_collectives and args.case is None
    records, collected, versions = [], [], {}
    for family in ("gpu", "tpu"):
        mine = [t for t in targets if TARGETS[t].family == family]
        if mine:
            output = run_worker(family, mine, args, collectives and family == "tpu")
            records += output["records"]
            collected += output["collectives"]
            versions = {"jax": output["jax"], "flax": output["flax"]}
    rows = pair_records(records)
    result = {
        "environment": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            **versions, "source": str(args.source.resolve()),
            "source_revision": args.revision or source_revision(args.source),
            "targets": {t: TARGETS[t].description for t in targets},
        },
        "summary": summarize(rows), "rows": rows, "collectives": collected,
        "records": records,
    }
    text = report(result)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
