"""The training loop: data -> sharded state -> compiled multi-step calls -> logs, evals, checkpoints.

One code path for one CPU and for a pod: the state is created directly with the shardings that the
logical-axis rules give on `config.mesh`, and the train step is one `jax.jit` over that mesh.
On several hosts every process runs this same loop: it loads only its rows of each batch, and
process 0 alone writes the config, metrics and logs (orbax coordinates the checkpoint writes).
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterator, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from model import LM, blocks, count_params, training_flops_per_token
from model.config import check_context
from train import checkpoint as ckpt_lib
from train import executables
from train import config as config_lib
from train import data as data_lib
from train import mesh as mesh_lib
from train import objectives, optim, perf, step as step_lib, workdir as workdir_lib
from train.checkpoint import NonFiniteError
from train.metric_writer import MetricWriter
from train.preemption import Interrupted, StopRequest
from train.progress import Progress, phase
from train.state import Layout, StartRun, recorded_pin, union


def _init_fn(layout: Layout, optimizer, seed: int, num_steps: int = 0):
  """() -> the initial TrainState with zeros for its frozen parameters (`Layout`), every array
  boxed with logical axis names: optax maps over the boxes, so one rules table shards the
  parameters and their optimizer state alike."""
  def init():
    params = layout.init_trainable(jax.random.key(seed))
    frozen = layout.abstract_frozen()
    if frozen is not None:  # read from the start run afterwards; zeros give the layout
      frozen = jax.tree.map(lambda box: box.replace_boxed(jnp.zeros(box.value.shape,
                                                                    box.value.dtype)),
                            frozen, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return step_lib.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), frozen,
                               jnp.asarray(num_steps, jnp.int32))
  return init


def state_shardings(model: LM, optimizer, mesh, layout: Layout | None = None):
  """The train state's NamedShardings on `mesh`. A parameter dimension that the mesh does not
  divide fails here, before anything compiles."""
  abstract = jax.eval_shape(_init_fn(layout or Layout(model), optimizer, seed=0))
  for params in (abstract.params, abstract.frozen):  # frozen: a reference, LoRA's base, a teacher
    mesh_lib.check_params(params, mesh)
  return mesh_lib.logical_shardings(abstract, mesh)


def init_state(model: LM, optimizer, mesh, seed: int, shardings=None,
               layout: Layout | None = None, num_steps: int = 0):
  """The train state created on the mesh with its shardings (`state_shardings`'s unless given):
  (state, shardings). Its frozen parameters, if the layout has any, are zeros until read;
  `num_steps` is the schedule's length (train.num_steps), which the step reads as data."""
  layout = layout or Layout(model)
  shardings = shardings or state_shardings(model, optimizer, mesh, layout)
  init = _init_fn(layout, optimizer, seed, num_steps)
  # Compiled without XLA's backend optimisations: it runs once, and optimising the random
  # initialisers of a large tree takes seconds.
  init = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings).lower()
  return init.compile({'xla_backend_optimization_level': 0})(), shardings


def abstract_state(model: LM, optimizer, mesh, layout: Layout | None = None):
  """The train state as ShapeDtypeStructs with its shardings on `mesh`, nothing allocated: what
  `init_state` creates, for compiling ahead of time (train/compile_for.py)."""
  layout = layout or Layout(model)
  shardings = state_shardings(model, optimizer, mesh, layout)
  abstract = jax.eval_shape(lambda: nn.unbox(_init_fn(layout, optimizer, seed=0)()))
  return ckpt_lib.abstract_like(abstract, shardings)


def check_batches(train_cfg, mesh) -> None:
  """Raises MeshError unless the training (micro-)batch and the eval batch split over the mesh."""
  tc = train_cfg
  mesh_lib.check_batch(tc.batch_size // tc.grad_accum_steps, mesh,
                       'train.batch_size' if tc.grad_accum_steps == 1 else
                       'the micro-batch train.batch_size / train.grad_accum_steps')
  mesh_lib.check_batch(tc.eval_batch_size, mesh, 'train.eval_batch_size')


def train_call(model: LM, optimizer, train_cfg, mesh, shardings, loss_fn=None,
               layout: Layout | None = None):
  """The multi-step train call a run compiles (`sharded_multi_step` of the train step): the one
  builder of the training loop and of `python -m experiments.benchmark`, so the benchmark times
  the loop's very program. `loss_fn(model)` defaults to the language-modelling loss; the layout
  turns the trained (and frozen) parameters into the model's; the schedule's length is read from
  the state (`TrainState.num_steps`)."""
  layout = layout or Layout(model)
  loss = (loss_fn or (lambda m: step_lib.make_loss_fn(m, dropout=m.config.dropout > 0)))(model)
  train_step = step_lib.make_train_step(
      model, optimizer, optim.learning_rate_schedule(train_cfg), train_cfg.seed,
      train_cfg.grad_accum_steps,
      loss_fn=lambda params, batch, rng, frozen: loss(layout.model_params(params, frozen),
                                                      batch, rng, frozen),
      for_length=lambda n: (optim.make_optimizer(train_cfg, num_steps=n),
                            optim.learning_rate_schedule(train_cfg, n)))
  return sharded_multi_step(train_step, mesh, shardings)


def sharded_multi_step(train_step, mesh, shardings):
  """`make_multi_step(train_step)` as one jit over the mesh: the state (donated) and the stacked
  batches (K, B, L) go in with their shardings; metrics come out replicated, so every process
  can read them."""
  return mesh_lib.jit(step_lib.make_multi_step(train_step), mesh,
                      in_shardings=(shardings, mesh_lib.batch_sharding(mesh, leading_axes=1)),
                      out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)


def bytes_per_device(tree) -> int:
  """Bytes of `tree` that one device holds under its shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * leaf.dtype.itemsize
  return total


def flatten_layer_metrics(tree, prefix: str = 'layers') -> dict:
  """The model's per-layer metrics collection (the last step's values) as scalar keys
  'layers/layer_<i>/<module path>/<name>[/<element>]', e.g. 'layers/layer_1/ffn/expert_share/3':
  a scanned run's stacked values get one key per layer, a vector one key per element; the
  'blocks' scope is left out of the names."""
  flat = {}
  for names, sown in traverse_util.flatten_dict(tree).items():
    if names[0] == 'blocks':
      names = names[1:]
    value = np.asarray(sown[0])[-1]  # `sow` keeps a tuple of values; the steps are stacked
    indices = blocks.run_layers(names[0])
    layers = ([(blocks.run_name(i, 1), value[i - indices.start]) for i in indices]
              if indices is not None and len(indices) > 1 else [(names[0], value)])
    for layer, v in layers:
      key = '/'.join([prefix, layer, *names[1:]])
      for index in np.ndindex(v.shape):
        flat['/'.join([key, *map(str, index)])] = float(v[index])
  return flat


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       evaluators: Sequence[Callable] = ()) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final validation metrics. Each of
  `evaluators`, `fn(params, step) -> dict`, runs at every evaluation (the periodic ones and the
  last) and its metrics join the validation metrics in that step's row."""
  start_time = time.time()
  # A run that fails before its first checkpoint (a refusal, NaN at the first steps) had nothing
  # worth keeping: what it wrote goes, so the corrected command starts afresh in the directory.
  with workdir_lib.undone_on_failure(workdir, keep=lambda: ckpt_lib.has_checkpoint(workdir),
                                     enabled=jax.process_index() == 0):
    run = Run(config, workdir, evaluators)
    try:
      final = run.train()
    finally:  # also on errors and interruptions: finish the checkpoint in flight, flush the logs
      run.close()
  final = dict(final, wall_s=time.time() - start_time)
  if run.chief:
    print(f'done: step {final["step"]}, {describe(final)}, wall {final["wall_s"]:.1f}s')
  return final


def describe(metrics: dict) -> str:
  """'val_loss 1.6743, val_perplexity 5.335, ...': the validation metrics, counts as counts."""
  return ', '.join(f'{k} {v:,}' if isinstance(v, int) else f'{k} {v:.4g}'
                   for k, v in metrics.items() if k.startswith('val_'))


def check_length_kept(saved_num_steps: int, train_cfg, workdir: str) -> None:
  """A resumed run may change train.num_steps only where that keeps the learning rate of every
  step it has taken (the latest checkpoint's): a constant schedule, or one still warming up. A
  decaying schedule stretched or cut would change them, and the run would not continue the
  one it resumes: refused (RunError), naming the way to train further."""
  tc, taken = train_cfg, max(ckpt_lib.saved_steps(workdir), default=0)
  if tc.num_steps == saved_num_steps or not taken:
    return
  steps = jnp.arange(taken)
  kept = np.array_equal(optim.learning_rate_schedule(tc, saved_num_steps)(steps),
                        optim.learning_rate_schedule(tc, tc.num_steps)(steps))
  if tc.num_steps < taken or not kept:
    why = (f'is below the step {taken} the run has reached' if tc.num_steps < taken else
           f'changes the learning rate of the {taken} steps taken (train.schedule={tc.schedule} '
           f'decays over train.num_steps)')
    raise workdir_lib.RunError(
        f'train.num_steps: {saved_num_steps} -> {tc.num_steps} {why}, so the run in {workdir} '
        f'would not continue as it began. Resume with train.num_steps={saved_num_steps}; to '
        f'train further, start a new run from its parameters (a new --workdir with '
        f'--init_from={workdir}); train.schedule=constant runs can be extended.')


def _checked_data(objective, workdir: str, start):
  """The objective's data (train.objectives.base.Data): the work directory's, else built in
  memory (with the start run's tokenizer when there is one). On several processes, process 0
  first (it writes what it built once every check has passed); the others then read it, or
  build the same where the directory is not shared."""
  if jax.process_index() != 0:
    multihost_utils.sync_global_devices('data prepared')
    data = objective.data(workdir, start)
    data.built = False  # process 0 saves
    return data
  return objective.data(workdir, start)


class Run:
  """One training run: everything built from the config and the work directory, then `train`.

  Every check runs before anything is written: a refused config leaves the work directory as it
  found it (or absent); so does a new run that fails later but before its first checkpoint
  (`train_and_evaluate` removes what it wrote)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               evaluators: Sequence[Callable] = ()):
    try:
      self._build(config, workdir, evaluators)
    except BaseException:  # releases the lock and the files it opened
      self.close()
      raise

  def _build(self, config: ml_collections.ConfigDict, workdir: str,
             evaluators: Sequence[Callable]) -> None:
    tc, dc = config.train, config.data
    self.evaluators = tuple(evaluators)
    self.chief = jax.process_index() == 0
    self.workdir = workdir
    self.lock = None
    config_lib.check_run_config(config)
    workdir_lib.check_model_section(config.model)
    self.mesh = mesh_lib.make_mesh(config.mesh)
    check_batches(tc, self.mesh)
    saved = workdir_lib.load_config(workdir)
    if saved is not None:
      workdir_lib.check_compatible(saved, config, workdir)
      check_length_kept(saved.train.num_steps, tc, workdir)
    self.objective = objectives.make(config)
    resuming = ckpt_lib.has_checkpoint(workdir)
    needs_frozen = self.objective.reference or config.lora.rank > 0
    start = (StartRun(tc.init_from, config, *recorded_pin(saved, config, 'train.init_from'))
             if tc.init_from and (not resuming or needs_frozen) else None)
    # The runs whose parameters this one reads, each at the step pinned when it began.
    pins = {field: ckpt_lib.pin(directory, field, *recorded_pin(saved, config, field))
            for field, directory in self.objective.frozen_runs().items()}
    pins['train.init_from'] = ((start.step, start.fingerprint) if start is not None
                               else recorded_pin(saved, config, 'train.init_from'))
    self.data = _checked_data(self.objective, workdir, start)
    self.model_cfg = workdir_lib.resolve_model_config(config.model,
                                                      self.data.tokenizer.vocab_size)
    check_context(self.model_cfg, dc.seq_len, 'data.seq_len')
    self.model = model = LM(self.model_cfg)
    # The config as the run records it: resolved paths and sizes, the pinned steps.
    self.config = config = ml_collections.ConfigDict(config.to_dict())
    config.model.vocab_size = self.model_cfg.vocab_size
    config.data.path = os.path.abspath(dc.path) if dc.path else ''
    config.train.init_from = os.path.abspath(tc.init_from) if tc.init_from else ''
    for field, directory in self.objective.frozen_runs().items():
      section, key = field.split('.')
      config[section][key] = os.path.abspath(directory)
    for field, (step, fingerprint) in pins.items():
      if step is not None:
        section, key = field.split('.')
        config[section][f'{key}_step'], config[section][f'{key}_fingerprint'] = step, fingerprint
    # Its own checks of the run, and the other runs it reads at their pinned steps (RL's reward
    # model, distillation's teacher).
    self.objective.prepare(self)
    frozen_models = self.objective.frozen_models()
    self.layout = Layout(model, self.objective.head, start, self.objective.reference,
                         config.lora if config.lora.rank > 0 else None,
                         {name: m for name, (m, _) in frozen_models.items()})
    optimizer = optim.make_optimizer(tc)
    shardings = state_shardings(model, optimizer, self.mesh, self.layout)  # the mesh fits
    if start is not None:  # the started parameters (frozen, trained, or both: Layout), verified
      started = start.params(ckpt_lib.abstract_like(
          nn.unbox(self.layout.started), mesh_lib.logical_shardings(self.layout.started,
                                                                    self.mesh)))

    # Checked: from here on the run writes.
    if self.chief:
      os.makedirs(workdir, exist_ok=True)
      self.lock = workdir_lib.Lock(workdir)
      if self.data.built:
        self.objective.save(workdir, self.data)
      workdir_lib.save_config(config, workdir)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('data prepared')

    self.state, _ = init_state(model, optimizer, self.mesh, tc.seed, shardings, self.layout,
                               num_steps=tc.num_steps)
    if start is not None:
      if self.layout.has_frozen:  # a copy: the trained parameters' buffers are donated
        self.state = self.state.replace(frozen=dict(self.state.frozen,
                                                    start=jax.tree.map(jnp.copy, started)))
      if not self.layout.rank:
        self.state = self.state.replace(params=union(self.state.params, started))
    if frozen_models:  # laid out as the state's shardings say
      self.state = self.state.replace(frozen=dict(self.state.frozen, **{
          name: jax.device_put(params, shardings.frozen[name])
          for name, (_, params) in frozen_models.items()}))
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
    restored = self.checkpointer.restore_latest(
        ckpt_lib.abstract_like(self.state.params, shardings.params),
        ckpt_lib.abstract_like(self.state.opt_state, shardings.opt_state))
    data_start, self.started_from = 0, None
    if restored is not None:
      step, params, opt_state, data_state = restored
      self.state = self.state.replace(step=jnp.asarray(step, jnp.int32), params=params,
                                      opt_state=opt_state)
      data_start = data_state['next_index']
    elif start is not None:
      self.started_from = f'the parameters of {start.directory} at step {start.step}'
    self.writer = MetricWriter(workdir, start_step=int(self.state.step), enabled=self.chief)
    self.iterator = data_lib.BatchIterator(
        self.objective.train_dataset(self.data, *mesh_lib.process_batch_block(self.mesh)),
        start=data_start)

    self.multi_step = train_call(model, optimizer, tc, self.mesh, shardings,
                                 self.objective.loss_fn, self.layout)
    self.steps_sharding = mesh_lib.batch_sharding(self.mesh, leading_axes=1)
    self.compiled = {}  # steps per call -> the compiled multi-step
    self.compile_s = 0.0
    self.flops_per_token = training_flops_per_token(self.model_cfg, dc.seq_len)
    self.peak, self.peak_source = perf.peak(self.model_cfg.dtype, tc.peak_flops)
    # A measured peak (not train.peak_flops, not a published one) may have been taken on a busy
    # machine: a run that computes faster measures it again (`_check_peak`).
    self.peak_measured = (not tc.peak_flops
                          and perf.known_peak(jax.devices()[0].device_kind) is None)
    self.progress = Progress(tc.num_steps, int(self.state.step), enabled=self.chief)

  def evaluate(self, max_batches: int) -> dict:
    """The validation metrics on `max_batches` batches (all when negative), and the
    evaluators'."""
    metrics = self.objective.evaluate(self, max_batches)
    for evaluator in self.evaluators:
      metrics.update(evaluator(self.model_params(), int(self.state.step)))
    return metrics

  def model_params(self):
    """The parameters the model applies now (LoRA's merged with the base)."""
    return self.layout.model_params(self.state.params, self.state.frozen)

  def report_start(self) -> None:
    counts = count_params(self.model_cfg)
    tc, dc = self.config.train, self.config.data
    step = int(self.state.step)
    if step:
      start = f'resuming from step {step}'
    elif self.started_from:
      start = f'starting from {self.started_from}'
    else:
      start = 'starting'
    active = (f', {counts.active_non_embedding:,} of them active per token'
              if counts.active_non_embedding != counts.non_embedding else '')
    self.progress.write(
        f'model: {counts.total:,} parameters ({counts.non_embedding:,} non-embedding{active}), '
        f'{self.flops_per_token / 1e6:.2f} MFLOPs per token, pattern {self.model_cfg.pattern}\n'
        f'devices: {perf.device_description()}'
        f'{f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""}, '
        f'mesh {dict(self.mesh.shape)}, '
        f'{bytes_per_device(self.state.params) / 2**20:.2f} MiB parameters and '
        f'{bytes_per_device(self.state.opt_state) / 2**20:.2f} MiB optimizer state per device; '
        f'MFU peak {self.peak / 1e9:,.0f} GFLOP/s ({self.peak_source})\n'
        f'batch: {tc.batch_size} examples of {dc.seq_len} tokens, '
        f'{tc.batch_size // mesh_lib.batch_shards(self.mesh)} sequences per device, '
        f'{self.objective.tokens_per_step():,} tokens per step; '
        f'{start} in {self.workdir}')

  def _call_sizes(self, step: int) -> Iterator[int]:
    """Steps of each compiled call from `step` on: the objective's steps per call, cut so that
    calls end on evaluation and checkpoint steps."""
    tc = self.config.train
    per_call = self.objective.steps_per_call()
    while step < tc.num_steps:
      k = min(per_call, tc.num_steps - step)
      for every in (tc.eval_every, tc.checkpoint_every):
        if every > 0:
          k = min(k, every - step % every)
      yield k
      step += k

  def _next_batches(self, k: int, step: int):
    """(the objective's next k batches on the devices, metrics of making them); (None, {})
    past the last call."""
    if not k:
      return None, {}
    batches, metrics = self.objective.batches(self, k, step)
    return mesh_lib.put_batch(batches, self.steps_sharding), metrics

  def _executable(self, k: int, batches):
    """The multi-step of `k` steps, compiled ahead of its first call (and announced)."""
    if k not in self.compiled:
      start = time.time()
      with phase(f'compiling the train step ({k} steps per call)'):
        self.compiled[k] = executables.compile(self.multi_step.lower(self.state, batches),
                                               self.mesh)
      self.compile_s += time.time() - start
    return self.compiled[k]

  def train(self) -> dict:
    """The loop. Each call is dispatched, then the next call's batches are prepared and placed
    while the device computes, and only then are the call's metrics read back; batches made
    from the parameters (`batches_read_params`, a rollout) are made after the update instead."""
    tc = self.config.train
    tokens_per_step = self.objective.tokens_per_step()
    ahead = not self.objective.batches_read_params
    self.report_start()
    step = int(self.state.step)
    sizes = self._call_sizes(step)
    k = next(sizes, 0)
    batches, made = self._next_batches(k, step)
    window = Window()
    final = None
    with StopRequest() as stop:
      while k:
        executable = self._executable(k, batches)
        window.start()
        self.state, metrics = executable(self.state, batches)
        data_state = self.iterator.state()  # the position after this call's batches
        next_k = next(sizes, 0)
        if ahead:
          batches, next_made = self._next_batches(next_k, step + k)
        losses, grad_norms = jax.device_get((metrics['loss'], metrics['grad_norm']))
        self._stop_on_non_finite(step, losses, grad_norms)
        call_s = window.add_call(k * tokens_per_step)
        rows = self._rows(step, losses, metrics, window)
        step += k
        if made:  # the batches' own metrics (a rollout's rewards) go to the call's last row
          rows.setdefault(step, {}).update(made, update_s=call_s)
        # Saved before evaluating: an evaluation that fails loses no training.
        interrupted = step < tc.num_steps and stop.requested()
        if (step == tc.num_steps or interrupted
            or (tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0)):
          self.checkpointer.save(step, self.state.params, self.state.opt_state, data_state)
        if step == tc.num_steps or (tc.eval_every > 0 and step % tc.eval_every == 0):
          whole = step == tc.num_steps
          final = self.evaluate(-1 if whole else tc.eval_batches)
          rows.setdefault(step, {}).update(final)
          self.progress.write(
              f'step {step}, on ' + ('the whole validation split' if whole else
                                     f'{tc.eval_batches} validation batches')
              + f': {describe(final)}')
        for s, row in rows.items():
          self.writer.write(s, row)
        if interrupted:
          self.checkpointer.wait()
          raise Interrupted(step, stop.signum)
        if not ahead:
          batches, next_made = self._next_batches(next_k, step)
        k, made = next_k, next_made
    if final is None:  # resumed a finished run: report its validation metrics again
      final = self.evaluate(-1)
    return dict(final, step=step, compile_s=self.compile_s)

  def _rows(self, step: int, losses: np.ndarray, metrics: dict, window: 'Window') -> dict:
    """The metric rows of this call's steps, by step: one for each multiple of log_every (and
    the last step); train_loss is the mean over the steps since the previous row."""
    tc = self.config.train
    rows = {}
    for i, loss in enumerate(losses):
      window.losses.append(float(loss))
      s = step + i + 1
      if s % tc.log_every and s != tc.num_steps:
        continue
      row = {'train_loss': float(np.mean(window.losses)),
             'lr': float(np.asarray(metrics['lr'])[i]),
             'grad_norm': float(np.asarray(metrics['grad_norm'])[i])}
      # The objective's other metrics at this step (KL, clip fraction, margins, ...); the
      # auxiliary loss only where layers report metrics (MoE).
      row.update({f'train_{name}': float(np.asarray(value)[i]) for name, value in metrics.items()
                  if name not in ('loss', 'lr', 'grad_norm', 'layers', 'aux_loss')})
      if metrics['layers']:
        row['aux_loss'] = float(np.asarray(metrics['aux_loss'])[i])
        if i == len(losses) - 1:
          row.update(flatten_layer_metrics(metrics['layers']))
      progress = {'loss': row['train_loss']}
      if window.seconds > 0:
        row['tokens_per_s'] = window.tokens / window.seconds
        self._check_peak(self.flops_per_token * row['tokens_per_s'])
        row['mfu'] = perf.mfu(self.flops_per_token, row['tokens_per_s'], self.peak)
        progress.update(tok_s=int(row['tokens_per_s']), mfu=f'{100 * row["mfu"]:.1f}%')
      rows[s] = row
      self.progress.update(s, **progress)
      window.reset()
    return rows

  def _check_peak(self, achieved_flops: float) -> None:
    """Raises a measured MFU peak that the run beats (perf.raised_peak), saying so."""
    raised = (perf.raised_peak(self.peak, achieved_flops, self.model_cfg.dtype)
              if self.peak_measured else None)
    if raised is not None:
      self.peak, note = raised
      self.progress.write(note)

  def _stop_on_non_finite(self, step: int, losses: np.ndarray, grad_norms: np.ndarray) -> None:
    """Raises NonFiniteError at the first step of the call whose loss or gradient is not finite;
    the state after it is not saved."""
    for i, (loss, grad_norm) in enumerate(zip(losses, grad_norms)):
      if not np.isfinite(loss) or not np.isfinite(grad_norm):
        what = (f'training loss became {loss}' if not np.isfinite(loss)
                else f'gradient norm became {grad_norm}')
        raise NonFiniteError(f'the {what} at step {step + i + 1}; stopping. '
                             f'{self.checkpointer.intact_note()} Lower train.lr, raise '
                             f'train.warmup_steps or set train.grad_clip.')

  def close(self) -> None:
    for closing in ('checkpointer', 'writer', 'progress'):
      if hasattr(self, closing):
        if closing == 'checkpointer':
          self.checkpointer.wait()
        getattr(self, closing).close()
    if getattr(self, 'lock', None) is not None:
      self.lock.release()


class Window:
  """Losses, time and tokens since the last log row. A call's time runs from its dispatch to the
  moment its metrics are read (the next call's batches are prepared in between); compiling
  happens before, apart (`Run._executable`)."""

  def __init__(self):
    self._started = None
    self.reset()

  def reset(self):
    self.losses, self.seconds, self.tokens = [], 0.0, 0

  def start(self):
    self._started = time.time()

  def add_call(self, tokens: int) -> float:
    """Adds the call that `start` began; its seconds."""
    seconds = time.time() - self._started
    self.seconds += seconds
    self.tokens += tokens
    return seconds
