"""Knowledge distillation (Hinton et al. 2015): a student learns the next-token distribution of a
frozen teacher run, mixed with the cross-entropy of the text itself:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, target)

per token, where s and t are the student's and the teacher's logits and T is
`distill.temperature` (T^2 keeps the KL term's gradients at the scale of the CE term's as T
grows); `distill.alpha` mixes the two (1: the teacher alone, 0: plain language modelling). With
`distill.top_k` = k > 0 both distributions are restricted to the teacher's k largest logits at
each position and renormalised there (Tunix's LogitStrategy): the KL ignores the teacher's tail
and what the student puts outside the teacher's top k.

The teacher is another run's work directory (`distill.teacher`), of any pattern (an attention
teacher of a Mamba or hybrid student, say), read at its latest step when the run begins and at
that step ever after (`distill.teacher_step` and `_fingerprint` in config.json): a resumed run
whose teacher changed is refused in one line. It must share the student's tokenizer: the
student's corpus is encoded with the teacher's. Its parameters sit in the train state's frozen
parameters (`frozen['teacher']`), outside the optimizer and the student's checkpoints.

The batches and the validation metrics are language modelling's (train/objectives/lm.py) on the
student's data config: `python -m eval` reads a distilled student as any language model, without
its teacher. Training rows add train_kd_loss (the T^2-scaled KL) and train_ce_loss per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn
from flax import traverse_util

from model import LM
from model.config import ConfigError, check_context
from train import step as step_lib, tokenizers, workdir as workdir_lib
from train.objectives.lm import LanguageModeling
from train.restore import load_run, same_tokenizer
from train.state import abstract_params


def kd_losses(student_logits_BxLxV, teacher_logits_BxLxV, temperature: float, top_k: int = 0):
  """T^2 KL(teacher || student) of the distributions softened by T, per position, in float32
  (B, L); over the teacher's `top_k` largest logits, both renormalised there, when top_k > 0."""
  s_BxLxV = student_logits_BxLxV.astype(jnp.float32) / temperature
  t_BxLxV = teacher_logits_BxLxV.astype(jnp.float32) / temperature
  if top_k:
    t_BxLxV, index_BxLxK = jax.lax.top_k(t_BxLxV, top_k)
    s_BxLxV = jnp.take_along_axis(s_BxLxV, index_BxLxK, axis=-1)
  kl = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(s_BxLxV),
                                                   jax.nn.log_softmax(t_BxLxV))
  return temperature ** 2 * kl


class Distillation(LanguageModeling):
  name = 'distill'

  def check(self) -> None:
    super().check()
    dc = self.config.distill
    if not dc.teacher:
      raise ConfigError('train.objective=distill needs distill.teacher, the work directory of '
                        'the teacher run (e.g. --config.distill.teacher=runs/teacher)')
    if not dc.temperature > 0:
      raise ConfigError(f'distill.temperature={dc.temperature} must be > 0')
    if not 0.0 <= dc.alpha <= 1.0:
      raise ConfigError(f'distill.alpha={dc.alpha} must be in [0, 1] (the weight of the KD '
                        f'term; 1 - alpha weighs the cross-entropy)')
    if dc.top_k < 0:
      raise ConfigError(f'distill.top_k={dc.top_k} must be >= 0 (0: the whole vocabulary)')

  def frozen_runs(self) -> dict[str, str]:
    return {'distill.teacher': self.config.distill.teacher}

  def tokenizer_from(self, start):
    """The teacher's tokenizer, which the student's corpus is encoded with: the teacher's and
    the student's tokenizer settings and any start run's tokenizer must agree."""
    teacher = self.config.distill.teacher
    saved = workdir_lib.load_config(teacher)
    if saved is None:
      raise workdir_lib.RunError(f'distill.teacher={teacher} holds no run (no '
                                 f'{workdir_lib.CONFIG_FILE}); give the --workdir of a trained run')
    diffs = workdir_lib.differences(saved.to_dict(), self.config.to_dict(),
                                    ['data.tokenizer', 'data.vocab_size'])
    if start is not None and not same_tokenizer(start.directory, teacher):
      diffs.append(f'train.init_from={start.directory} saved another tokenizer')
    if diffs:
      raise ConfigError(f'distill.teacher={teacher} reads another vocabulary than the student ('
                        + '; '.join(diffs) + '); the teacher and the student must share one')
    return tokenizers.load(f'{teacher}/tokenizer')

  def prepare(self, run) -> None:
    """The teacher at the step the run pinned, checked against the student."""
    dc = run.config.distill
    if not run.data.built and not same_tokenizer(run.workdir, dc.teacher):
      raise ConfigError(f'distill.teacher={dc.teacher} saved another tokenizer than the one in '
                        f'{run.workdir}; the teacher and the student must share one')
    teacher = load_run(dc.teacher, dc.teacher_step)
    if teacher.head == 'scalar':
      raise ConfigError(f'distill.teacher={dc.teacher} is a reward model (objective '
                        f'{teacher.config.train.objective}); give a language model\'s run')
    if teacher.model_cfg.vocab_size != run.model_cfg.vocab_size:
      raise ConfigError(f'distill.teacher={dc.teacher} has model.vocab_size='
                        f'{teacher.model_cfg.vocab_size}, the student '
                        f'{run.model_cfg.vocab_size}; give the student the teacher\'s')
    try:
      check_context(teacher.model_cfg, run.config.data.seq_len, 'data.seq_len')
    except ConfigError as e:
      raise ConfigError(f'distill.teacher={dc.teacher}: {e}') from None
    self.teacher_model = LM(teacher.model_cfg)
    # The parameters the logits read (a PPO teacher also has a value head).
    wanted = traverse_util.flatten_dict(nn.unbox(abstract_params(self.teacher_model)))
    flat = traverse_util.flatten_dict(teacher.params)
    self.teacher_params = traverse_util.unflatten_dict({k: flat[k] for k in wanted})

  def frozen_models(self):
    return {'teacher': (self.teacher_model, self.teacher_params)}

  def loss_fn(self, model):
    dc, teacher_model = self.config.distill, self.teacher_model

    def distillation_sums(logits, batch, w, frozen):
      teacher_logits = jax.lax.stop_gradient(teacher_model.apply(
          {'params': jax.lax.stop_gradient(frozen['teacher'])}, batch['inputs']))
      kd_sum = jnp.sum(kd_losses(logits, teacher_logits, dc.temperature, dc.top_k) * w)
      ce_sum = jnp.sum(step_lib.token_losses(logits, batch['targets']) * w)
      loss_sum = dc.alpha * kd_sum + (1.0 - dc.alpha) * ce_sum
      return loss_sum, {'loss': loss_sum, 'kd_loss': kd_sum, 'ce_loss': ce_sum}

    return step_lib.make_loss_fn(model, dropout=model.config.dropout > 0,
                                 loss_sums=distillation_sums)
