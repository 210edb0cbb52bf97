"""Validation metrics of a run: its objective's evaluation, compiled once over the mesh and run
over the validation batches (the first `max_batches`, or all of them)."""

from __future__ import annotations

import jax
import numpy as np

from model import LM
from train import executables, mesh as mesh_lib
from train.progress import bar, phase
from train.state import Layout


def sharded_eval_step(objective, model: LM, mesh, param_shardings, frozen_shardings,
                      layout: Layout | None = None):
  """The objective's eval_fn as one jit over the mesh (the rules active): step(params, frozen,
  batch) -> replicated sums, batches split over the batch axes."""
  layout = layout or Layout(model)
  eval_fn = objective.eval_fn(model)
  return mesh_lib.jit(
      lambda params, frozen, batch: eval_fn(layout.model_params(params, frozen), frozen, batch),
      mesh, in_shardings=(param_shardings, frozen_shardings, mesh_lib.batch_sharding(mesh)),
      out_shardings=mesh_lib.replicated(mesh))


def compile_eval_step(eval_step, spec: dict, mesh, params, frozen):
  """The jitted `eval_step(params, frozen, batch) -> sums` (`sharded_eval_step`) compiled
  ahead for batches of `spec` ({name: (global shape, dtype)}, an objective's eval_spec)."""
  sharding = mesh_lib.batch_sharding(mesh)
  batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
           for name, (shape, dtype) in spec.items()}
  with phase('compiling the evaluation step'):
    return executables.compile(eval_step.lower(params, frozen, batch), mesh)


def evaluate(eval_step, params, frozen, objective, data, mesh,
             max_batches: int = -1) -> dict[str, float]:
  """The objective's (train.objectives.Objective's) validation metrics over its evaluation
  batches, laid out on `mesh`: this process loads only its block of each batch's rows."""
  batch_size = objective.config.train.eval_batch_size
  mesh_lib.check_batch(batch_size, mesh, 'train.eval_batch_size')
  sharding = mesh_lib.batch_sharding(mesh)
  batches = objective.eval_batches(data, max_batches, *mesh_lib.process_batch_block(mesh))
  if max_batches < 0:
    batches = bar(batches, objective.num_eval_batches(data, max_batches),
                  'evaluating on the whole validation split')
  sums = {}
  for batch in batches:
    out = jax.device_get(eval_step(params, frozen, mesh_lib.put_batch(batch, sharding)))
    for name, value in out.items():
      sums[name] = sums.get(name, 0.0) + float(np.asarray(value))
  return objective.summarize(sums, data)
