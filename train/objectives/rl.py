"""Reinforcement learning from rewards, on policy: GRPO (Shao et al. 2024) and RLHF with PPO
(Schulman et al. 2017; Ouyang et al. 2022).

Each of the loop's calls is one rollout and the updates that learn from it:

  rollout   a batch of prompts (`train.batch_size` of them, from `data.path`'s JSON lines),
            `rl.group_size` answers each, sampled through the KV-cache sampler
            (`model.decode.generate`, the model's own generation) at `rl.temperature` and
            `rl.top_p`, each stopping at the chat template's end of turn; then their rewards,
            the policy's and the frozen reference's log-probabilities of every answer token,
            and the advantages
  updates   `rl.ppo_epochs` passes over `rl.num_minibatches` minibatches of the rollout: the
            PPO clipped objective, one optimizer step per minibatch

Rewards, for either method: `rl.reward`, a function `module:function` called with the prompt,
the answer and the example's other fields (train/rewards.py), or `rl.reward_model`, the work
directory of a run of objective 'reward', whose score of the whole answer at its last token is
the reward.
GRPO: the advantage of an answer is its reward minus its group's mean (divided by the group's
standard deviation unless `rl.scale_rewards` is off, as Dr. GRPO drops it), the same for each of
its tokens, with a per-token KL penalty to the reference in the loss, k3 = exp(ref - logp) -
(ref - logp) - 1 (Schulman's estimator, >= 0, 0 when they agree), weighted by `rl.beta`.
PPO (RLHF): the policy and a value head share one trunk (LM(head='both')); the reward at the
answer's last token, minus beta x (logp - ref) at every token (the KL penalty folded into the
reward);
advantages by GAE (`rl.gamma`, `rl.lam`), whitened; a clipped value loss weighted by
`rl.vf_coef`. Losses are normalised per token (`rl.loss_normalization='token'`) or per answer
('sequence'). Metrics: reward mean and std, accuracy (`rl.accuracy`, a function as `rl.reward`),
KL to the reference, policy entropy, clip fraction, answer length, value loss (PPO), rollout and
update time and rollout tokens/s.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ConfigError
from model.decode import Sampling, generate
from train import chat, rewards as rewards_lib, step as step_lib
from train.objectives.base import Data, Examples, Objective, example_dataset
from train.objectives.sft import conversation_data, save_conversation_setup
from train.progress import bar
from train.restore import load_run


def group_advantages(rewards_BxG, scale: bool = True, eps: float = 1e-6):
  """GRPO's advantage of each answer: its reward minus its group's mean, divided by the group's
  standard deviation when `scale`. (B, G)."""
  centred = rewards_BxG - rewards_BxG.mean(axis=1, keepdims=True)
  return centred / (rewards_BxG.std(axis=1, keepdims=True) + eps) if scale else centred


def k3_kl(logp, ref_logp):
  """Schulman's k3 estimator of KL(policy || reference) per token: e^(ref - logp) - (ref -
  logp) - 1."""
  log_ratio = ref_logp - logp
  return jnp.exp(log_ratio) - log_ratio - 1.0


def clipped_policy_loss(logp, old_logp, advantages, epsilon: float):
  """PPO's clipped surrogate per token, as a loss: -min(r A, clip(r, 1 - eps, 1 + eps) A) with
  r = exp(logp - old_logp); and whether the clipped term was the one taken."""
  ratio = jnp.exp(logp - old_logp)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages
  return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def gae(rewards_T, values_T, gamma: float, lam: float):
  """Generalised advantage estimation over one answer's T tokens (Schulman et al. 2016), the
  value after the last token 0: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam
  A_{t+1}. (advantages, returns = advantages + values), numpy."""
  advantages = np.zeros(len(rewards_T), np.float64)
  next_value, running = 0.0, 0.0
  for t in reversed(range(len(rewards_T))):
    delta = rewards_T[t] + gamma * next_value - values_T[t]
    running = delta + gamma * lam * running
    advantages[t] = running
    next_value = values_T[t]
  return advantages, advantages + np.asarray(values_T, np.float64)


def entropy(logits):
  """The policy's entropy per token, from its logits. (B, L)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


class OnPolicy(Objective):
  """What GRPO and PPO share: prompts, rollouts, minibatches, losses' normalisation."""
  reference = True
  batches_read_params = True  # a rollout samples from the updated policy

  def check(self) -> None:
    super().check()
    rl, tc = self.config.rl, self.config.train
    if rl.group_size < 1 or rl.ppo_epochs < 1 or rl.num_minibatches < 1:
      raise ConfigError('rl.group_size, rl.ppo_epochs and rl.num_minibatches must be >= 1')
    if (tc.batch_size * rl.group_size) % rl.num_minibatches:
      raise ConfigError(f'rl.num_minibatches={rl.num_minibatches} does not divide the '
                        f'{tc.batch_size} x {rl.group_size} answers of a rollout')
    k = self.steps_per_call()
    for field in ('num_steps', 'eval_every', 'checkpoint_every'):
      if tc[field] % k:
        raise ConfigError(f'train.{field}={tc[field]} is not a multiple of the {k} updates of '
                          f'a rollout (rl.ppo_epochs x rl.num_minibatches)')
    if rl.loss_normalization not in ('token', 'sequence'):
      raise ConfigError(f'rl.loss_normalization={rl.loss_normalization!r}: choose token or '
                        f'sequence')
    if not 0.0 < rl.top_p <= 1.0 or rl.temperature < 0:
      raise ConfigError('rl.top_p must be in (0, 1] and rl.temperature >= 0')
    if bool(rl.reward) == bool(rl.reward_model):
      raise ConfigError(f'train.objective={self.name} needs one reward: rl.reward, a function '
                        f'module:function (e.g. experiments.posttrain.task:exact_match), or '
                        f'rl.reward_model, the work directory of a run of objective reward')
    if rl.reward:
      rewards_lib.load(rl.reward)
    if rl.accuracy:
      rewards_lib.load(rl.accuracy)

  def steps_per_call(self) -> int:
    """One call is one rollout and the updates that learn from it."""
    return self.config.rl.ppo_epochs * self.config.rl.num_minibatches

  def tokens_per_step(self) -> int:
    """An update reads one minibatch of the rollout: batch x group answers / minibatches rows,
    each the prompt and answer (data.seq_len tokens) less the last, which is only a target."""
    rl, tc = self.config.rl, self.config.train
    return tc.batch_size * rl.group_size // rl.num_minibatches * (self.config.data.seq_len - 1)

  # -- data: prompts ---------------------------------------------------------------------------

  def data(self, workdir: str, start) -> Data:
    data = conversation_data(self, workdir, start, chat.parse_prompt,
                             tokenizer_texts=lambda r: {'messages': r['prompt']})
    self.end_of_turn = self._end_of_turn(data.tokenizer, data.template)  # fails before compiling
    return data

  @staticmethod
  def _end_of_turn(tokenizer, template) -> int:
    ids = tokenizer.encode(template.end_of_turn)
    if len(ids) != 1:
      raise ConfigError(f'chat.end_of_turn={template.end_of_turn!r} encodes to {len(ids)} tokens; '
                        f'sampling stops on one, so choose text that is one token (e.g. "\\n" '
                        f'with a byte or character tokenizer)')
    return int(ids[0])

  def encode(self, tokenizer, template, records, split: str) -> Examples:
    room = self.config.data.seq_len - self.config.rl.max_new_tokens
    prompts = [chat.encode(tokenizer, template.prompt(r['prompt']))[0]
               for r in bar(records, len(records), f'encoding the {split} prompts',
                            unit='prompt')]
    too_long = sum(len(p) > room for p in prompts)
    if too_long:
      raise ConfigError(f'{too_long} {split} prompts are longer than data.seq_len - '
                        f'rl.max_new_tokens = {room} tokens; raise data.seq_len')
    tokens = np.zeros((len(prompts), room), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    return Examples({'prompt': tokens, 'length': np.asarray([len(p) for p in prompts], np.int32),
                     'index': np.arange(len(prompts), dtype=np.int32)}, records)

  def save(self, workdir: str, data: Data) -> None:
    save_conversation_setup(workdir, data)

  def train_dataset(self, data: Data, process_index: int, process_count: int):
    tc = self.config.train
    return example_dataset(data.train, tc.batch_size, tc.seed, process_index, process_count)

  # -- rollouts -------------------------------------------------------------------------------

  def prepare(self, run) -> None:
    """The compiled pieces of a rollout, and the reward model (checked before the run writes)."""
    self.run = run
    rl = self.config.rl
    self.reward_fn = rewards_lib.load(rl.reward) if rl.reward else None
    self.accuracy_fn = rewards_lib.load(rl.accuracy) if rl.accuracy else None
    self.end_of_turn = self._end_of_turn(run.data.tokenizer, run.data.template)
    prefix = int(min(run.data.train.arrays['length'].min(),
                     run.data.validation.arrays['length'].min()))
    model = run.model

    def sample(params, prompts, lengths, rng, temperature):
      return generate(model, params, prompts, rng, max_new_tokens=rl.max_new_tokens,
                      sampling=Sampling(temperature, top_p=rl.top_p if temperature else 1.0),
                      eos_id=self.end_of_turn, prompt_lengths_B=lengths, prefix=prefix)

    self._sample = sample
    self._log_probs = jax.jit(self._log_probs_fn(model))
    if rl.reward_model:  # at the step pinned when the run began (the loop checked it is the same)
      self._load_reward_model(run.data.tokenizer, run.config.rl.reward_model_step)

  def frozen_runs(self) -> dict[str, str]:
    return {'rl.reward_model': self.config.rl.reward_model} if self.config.rl.reward_model else {}

  def _load_reward_model(self, tokenizer, step: int | None = None) -> None:
    reward_run = load_run(self.config.rl.reward_model, step)
    if reward_run.head != 'scalar':
      raise ConfigError(f'rl.reward_model={self.config.rl.reward_model} is not a reward model '
                        f'(its objective is {reward_run.config.train.objective})')
    if reward_run.tokenizer.vocab_size != tokenizer.vocab_size:
      raise ConfigError('rl.reward_model reads another tokenizer than the policy')
    self.reward_params = reward_run.params
    reward_model = reward_run.model

    def scores(params, tokens, last):
      s = reward_model.apply({'params': params}, tokens, head='scalar')
      return jnp.take_along_axis(s, last[:, None], axis=1)[:, 0]

    self._reward_model_scores = jax.jit(scores)

  def rewards(self, tokens, mask, texts, records, where: str) -> np.ndarray:
    """Each answer's reward (R,): the reward model's score at the answer's last token, or the
    reward function's value."""
    if self.config.rl.reward_model:
      answer_tokens = mask.sum(axis=1).astype(int)
      # Target t predicts token t + 1: the answer's last token is at its first target + length.
      last = np.where(answer_tokens > 0, mask.argmax(axis=1) + answer_tokens, 0)
      return np.asarray(self._reward_model_scores(self.reward_params, tokens, last), np.float32)
    return self._score(self.reward_fn, texts, records, where)

  def _log_probs_fn(self, model):
    def log_probs(params, tokens):
      logits = model.apply({'params': params}, tokens[:, :-1])
      return step_lib.token_log_probs(logits, tokens[:, 1:])
    return log_probs

  def _answers(self, params, batch, rng, temperature: float, group: int):
    """Sampled answers: (tokens (R, P + new), the answers' target mask (R, P + new - 1), the
    answers' texts, tokens generated)."""
    prompts = np.repeat(batch['prompt'], group, axis=0)
    lengths = np.repeat(batch['length'], group)
    width = prompts.shape[1] + self.config.rl.max_new_tokens
    tokens, new = self._sample(params, prompts, lengths, rng, temperature)
    tokens, new = np.asarray(tokens)[:, :width], np.asarray(new)
    positions = np.arange(width - 1)[None]
    # Target t predicts token t + 1: the answer's tokens are targets length - 1 ... on.
    mask = ((positions >= lengths[:, None] - 1)
            & (positions < (lengths + new)[:, None] - 1)).astype(np.float32)
    texts = []
    for row, (n, length) in enumerate(zip(new, lengths)):
      answer = tokens[row, length:length + n]
      if n and answer[-1] == self.end_of_turn:
        answer = answer[:-1]
      texts.append(self.run.data.tokenizer.decode(answer))
    return tokens, mask, texts, int(new.sum())

  def _score(self, fn, texts, records, where: str) -> np.ndarray:
    out = []
    for i, (text, record) in enumerate(zip(texts, records)):
      prompt = ''.join(m['content'] for m in record['prompt'])
      fields = {k: v for k, v in record.items() if k != 'prompt'}
      out.append(rewards_lib.score(fn, prompt, text, fields, f'{where}, answer {i}'))
    return np.asarray(out, np.float32)

  def batches(self, run, k: int, step: int):
    """A rollout from one batch of prompts with the run's current parameters: its `k` (=
    steps_per_call) minibatches and its metrics."""
    prompts = {name: x[0] for name, x in run.iterator.next(1).items()}
    return self.rollout(run.state, prompts, step)

  def rollout(self, state, batch: dict, step: int):
    """(the updates' minibatches stacked (K, R / M, ...) as numpy, the rollout's metrics)."""
    rl = self.config.rl
    start = time.time()
    params = self.run.layout.model_params(state.params, state.frozen)
    rng = jax.random.fold_in(jax.random.key(self.config.train.seed), step)
    tokens, mask, texts, generated = self._answers(params, batch, rng, rl.temperature,
                                                   rl.group_size)
    records = [self.run.data.train.records[i] for i in np.repeat(batch['index'], rl.group_size)]
    rollout_s = time.time() - start
    metrics = {'rollout_s': rollout_s, 'rollout_tokens_per_s': generated / rollout_s,
               'response_length': float(mask.sum(axis=1).mean())}
    if self.accuracy_fn is not None:
      metrics['accuracy'] = float(self._score(self.accuracy_fn, texts, records,
                                              f'step {step}').mean())
    fields = self.learning_signal(state, params, tokens, mask, texts, records, step, metrics)
    fields.update(tokens=tokens, mask=mask)
    return self._minibatches(fields, step), metrics

  def _minibatches(self, fields: dict, step: int) -> dict:
    """ppo_epochs passes of num_minibatches shuffled minibatches, stacked: (K, R / M, ...)."""
    rl = self.config.rl
    rows = len(fields['tokens'])
    rng = np.random.default_rng([self.config.train.seed, step])
    order = np.concatenate([rng.permutation(rows) for _ in range(rl.ppo_epochs)])
    order = order.reshape(rl.ppo_epochs * rl.num_minibatches, rows // rl.num_minibatches)
    out = {k: v[order] for k, v in fields.items()}
    tokens = out.pop('tokens')
    out.update(inputs=tokens[..., :-1], targets=tokens[..., 1:])
    return out

  def _normalised(self, per_token, mask, valid, extra: dict):
    """(sum, weight, sums of `extra`) under the configured normalisation: per token, or the mean
    over each answer's tokens summed over answers."""
    mask = mask * valid[:, None]
    if self.config.rl.loss_normalization == 'token':
      reduce = lambda x: jnp.sum(x * mask)
      weight = jnp.sum(mask)
    else:
      per_answer = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
      reduce = lambda x: jnp.sum(jnp.sum(x * mask, axis=1) / per_answer)
      weight = jnp.sum(valid)
    return reduce(per_token), weight, {k: reduce(v) for k, v in extra.items()}

  # -- evaluation: greedy answers to the validation prompts ------------------------------------

  def evaluate(self, run, max_batches: int) -> dict:
    """The reward (and accuracy) of greedy answers to the validation prompts (the first
    `max_batches` x train.batch_size of them, all when negative)."""
    examples = run.data.validation
    size = self.config.train.batch_size
    num = len(examples) if max_batches < 0 else min(len(examples), max_batches * size)
    params = run.layout.model_params(run.state.params, run.state.frozen)
    rewards, accuracy = [], []
    for start in range(0, num, size):
      rows = np.arange(start, start + size) % len(examples)
      batch = {k: v[rows] for k, v in examples.arrays.items()}
      tokens, mask, texts, _ = self._answers(params, batch, jax.random.key(0), 0.0, 1)
      records = [examples.records[i] for i in batch['index']]
      keep = min(size, num - start)
      rewards.append(self.rewards(tokens, mask, texts, records, 'validation')[:keep])
      if self.accuracy_fn is not None:
        accuracy.append(self._score(self.accuracy_fn, texts[:keep], records[:keep],
                                    'validation'))
    out = {'val_prompts': num, 'val_reward': float(np.concatenate(rewards).mean())}
    if accuracy:
      out['val_accuracy'] = float(np.concatenate(accuracy).mean())
    return out


class GRPO(OnPolicy):
  name = 'grpo'

  def learning_signal(self, state, params, tokens, mask, texts, records, step, metrics):
    rl = self.config.rl
    rewards = self.rewards(tokens, mask, texts, records, f'step {step}')
    grouped = rewards.reshape(-1, rl.group_size)
    advantages = np.asarray(group_advantages(grouped, rl.scale_rewards)).reshape(-1)
    old = np.asarray(self._log_probs(params, tokens))
    ref = np.asarray(self._log_probs(state.frozen['start'], tokens))
    metrics.update(reward=float(rewards.mean()), reward_std=float(rewards.std()))
    return {'old_logp': old, 'ref_logp': ref, 'advantages': advantages.astype(np.float32),
            'valid': np.ones(len(tokens), np.float32)}

  def loss_fn(self, model):
    rl = self.config.rl

    def loss_fn(params, batch, rng, frozen=None):
      del rng, frozen
      logits = model.apply({'params': params}, batch['inputs'])
      logp = step_lib.token_log_probs(logits, batch['targets'])
      policy, clipped = clipped_policy_loss(logp, batch['old_logp'],
                                            batch['advantages'][:, None], rl.epsilon)
      kl = k3_kl(logp, batch['ref_logp'])
      total, weight, sums = self._normalised(
          policy + rl.beta * kl, batch['mask'], batch['valid'],
          {'kl': kl, 'clip_fraction': clipped, 'entropy': entropy(logits),
           'policy_loss': policy})
      sums['loss'] = total
      return total, {'weight': weight, 'sums': sums, 'layers': {}}
    return loss_fn


class PPO(OnPolicy):
  name = 'ppo'
  head = 'both'

  def prepare(self, run) -> None:
    super().prepare(run)

    def log_probs_and_values(params, tokens):
      logits, values = run.model.apply({'params': params}, tokens[:, :-1], head='both')
      return step_lib.token_log_probs(logits, tokens[:, 1:]), values

    self._log_probs_and_values = jax.jit(log_probs_and_values)

  def learning_signal(self, state, params, tokens, mask, texts, records, step, metrics):
    rl = self.config.rl
    old, values = map(np.asarray, self._log_probs_and_values(params, tokens))
    ref = np.asarray(self._log_probs(state.frozen['start'], tokens))
    scores = self.rewards(tokens, mask, texts, records, f'step {step}')
    kl = old - ref  # k1 per token, folded into the reward
    advantages = np.zeros_like(old)
    returns = np.zeros_like(old)
    for row in range(len(tokens)):
      t = np.flatnonzero(mask[row])
      if not len(t):
        continue
      reward_T = -rl.beta * kl[row, t]
      reward_T[-1] += scores[row]
      a, r = gae(reward_T, values[row, t], rl.gamma, rl.lam)
      advantages[row, t], returns[row, t] = a, r
    on = mask > 0
    advantages[on] = (advantages[on] - advantages[on].mean()) / (advantages[on].std() + 1e-8)
    metrics.update(reward=float(scores.mean()), reward_std=float(scores.std()),
                   kl_penalty=float((kl * mask).sum() / max(mask.sum(), 1.0)))
    return {'old_logp': old, 'ref_logp': ref, 'advantages': advantages.astype(np.float32),
            'old_values': values.astype(np.float32), 'returns': returns.astype(np.float32),
            'valid': np.ones(len(tokens), np.float32)}

  def loss_fn(self, model):
    rl = self.config.rl

    def loss_fn(params, batch, rng, frozen=None):
      del rng, frozen
      logits, values = model.apply({'params': params}, batch['inputs'], head='both')
      logp = step_lib.token_log_probs(logits, batch['targets'])
      policy, clipped = clipped_policy_loss(logp, batch['old_logp'], batch['advantages'],
                                            rl.epsilon)
      old_values = batch['old_values']
      clipped_values = old_values + jnp.clip(values - old_values, -rl.value_clip,
                                             rl.value_clip)
      value_loss = 0.5 * jnp.maximum((values - batch['returns']) ** 2,
                                     (clipped_values - batch['returns']) ** 2)
      total, weight, sums = self._normalised(
          policy + rl.vf_coef * value_loss, batch['mask'], batch['valid'],
          {'kl': k3_kl(logp, batch['ref_logp']), 'clip_fraction': clipped,
           'entropy': entropy(logits), 'policy_loss': policy, 'value_loss': value_loss})
      sums['loss'] = total
      return total, {'weight': weight, 'sums': sums, 'layers': {}}
    return loss_fn
