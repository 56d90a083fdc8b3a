"""XLA compiler options for the train step, per backend.

XLA:CPU's copy insertion orders a program's instructions by their data dependencies only (unless told to analyse
regions). The train state is donated, so each new optimizer moment is written over the old one; but XLA:CPU fuses
the moment's update twice, into the moment's own output and into the parameter's update, and both read the old
moment. With nothing ordering those two reads before the overwrite, it copies every donated moment at the start of
the step (yinggem:tiny with AdamW: 120 copies, 6.4 MB a step on each device). Region analysis proves the copies
unneeded and drops them: the same bits, a 5% faster tiny step (bench/README.md). GPU and TPU compilers decide
this differently; the option is only given to CPU programs.
"""
from __future__ import annotations

from typing import Dict

from jax.sharding import Mesh

CPU_TRAIN_STEP = {"xla_cpu_copy_insertion_use_region_analysis": True}


def train_step(mesh: Mesh) -> Dict[str, bool]:
  """compiler_options for jax.jit of the train step on `mesh`'s devices."""
  return dict(CPU_TRAIN_STEP) if mesh.devices.flat[0].platform == "cpu" else {}
