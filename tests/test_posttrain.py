"""Post-training: the chat template and JSON lines, the SFT, reward-model and DPO losses against
their formulas, LoRA, and the path base -> SFT -> reward model / DPO through the one loop."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.restore import load_run
from model import LM
from model.config import ConfigError
from train import chat, lora, step as step_lib
from train.checkpoint import fingerprint
from train.data import DataError
from train.loop import Window, train_and_evaluate
from train.objectives import dpo as dpo_lib
from train.objectives import reward as reward_lib
from train.objectives import sft as sft_lib
from train.objectives import rl
from train.rewards import RewardError
from train.tokenizers import ByteTokenizer
from tests.conftest import run_config, tiny

TEMPLATE = chat.ChatTemplate(system='[S]', user='[U]', assistant='[A]', end_of_turn='|')


def test_the_template_weights_the_assistants_tokens_only():
  messages = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': '2+2?'},
              {'role': 'assistant', 'content': '4'}, {'role': 'user', 'content': 'and 3+3?'},
              {'role': 'assistant', 'content': '6'}]
  tokens, weights = chat.encode(ByteTokenizer(), TEMPLATE.pieces(messages))
  text = bytes(tokens.astype(np.uint8)).decode()
  assert text == '[S]be brief|[U]2+2?|[A]4|[U]and 3+3?|[A]6|'
  trained = ''.join(c for c, w in zip(text, weights) if w)
  assert trained == '4|6|'  # each answer and its end of turn
  prompt, _ = chat.encode(ByteTokenizer(), TEMPLATE.prompt(messages[:2]))
  assert bytes(prompt.astype(np.uint8)).decode() == '[S]be brief|[U]2+2?|[A]'


def write_lines(path, lines):
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return str(path)


def test_json_lines_in_the_public_layouts(tmp_path):
  demos = chat.read_jsonl(write_lines(tmp_path / 'sft.jsonl', [
      json.dumps({'prompt': 'hi', 'response': 'hello', 'id': 7}),
      '',
      json.dumps({'messages': [{'role': 'user', 'content': 'a'},
                               {'role': 'assistant', 'content': 'b'}]})]),
      chat.parse_demonstration)
  assert demos[0] == {'id': 7, 'messages': [{'role': 'user', 'content': 'hi'},
                                            {'role': 'assistant', 'content': 'hello'}]}
  assert len(demos) == 2
  pairs = chat.read_jsonl(write_lines(tmp_path / 'pref.jsonl', [
      json.dumps({'prompt': 'q', 'chosen': 'good', 'rejected': 'bad'}),
      json.dumps({'prompt': 'q', 'chosen': [{'role': 'user', 'content': 'q'},
                                             {'role': 'assistant', 'content': 'good'}],
                  'rejected': [{'role': 'assistant', 'content': 'bad'}]})]),
      chat.parse_preference)
  expected = {'prompt': [{'role': 'user', 'content': 'q'}],
              'chosen': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'good'}],
              'rejected': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'bad'}]}
  assert pairs == [expected, expected]


@pytest.mark.parametrize('line, parse, message', [
    ('{"prompt": "a", "response": ', chat.parse_demonstration, r'bad.jsonl:2: not valid JSON'),
    ('[1, 2]', chat.parse_demonstration, r'bad.jsonl:2: expected a JSON object, got list'),
    ('{"text": "a"}', chat.parse_demonstration, r'bad.jsonl:2: a demonstration needs "prompt" '
                                                 r'and "response" strings, or "messages"'),
    ('{"messages": [{"role": "bot", "content": "a"}]}', chat.parse_demonstration,
     r'bad.jsonl:2: every message of "messages" needs a "role"'),
    ('{"prompt": "a", "chosen": "b"}', chat.parse_preference,
     r"bad.jsonl:2: a preference needs .*\['rejected'\] missing"),
])
def test_every_malformed_line_is_named_by_file_and_line(tmp_path, line, parse, message):
  good = json.dumps({'prompt': 'a', 'response': 'b', 'chosen': 'c', 'rejected': 'd'})
  with pytest.raises(DataError, match=message):
    chat.read_jsonl(write_lines(tmp_path / 'bad.jsonl', [good, line]), parse)


def log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_dpo_and_bradley_terry_losses_equal_their_formulas():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(size=5) * 3 for _ in range(4))
  for beta, eps in ((0.1, 0.0), (0.5, 0.2)):
    h = (pc - rc) - (pr - rr)
    expected = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    np.testing.assert_allclose(dpo_lib.dpo_loss(pc, pr, rc, rr, beta, eps), expected, rtol=1e-5)
  np.testing.assert_allclose(reward_lib.bradley_terry_loss(pc, pr), -log_sigmoid(pc - pr),
                             rtol=1e-5)


def init(cfg, head='logits'):
  model = LM(cfg)
  return model, nn.unbox(jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32),
                                                      head=head))(jax.random.key(0)))['params']


def pair_batch(vocab, rows=3, length=12, seed=0):
  rng = np.random.default_rng(seed)
  batch = {'valid': np.ones(rows, np.float32)}
  for side in ('chosen', 'rejected'):
    weights = np.zeros((rows, length + 1), np.float32)
    weights[:, 6:10] = 1.0  # the answer's tokens
    batch.update({f'{side}_tokens': rng.integers(0, vocab, (rows, length + 1)),
                  f'{side}_weights': weights, f'{side}_last': np.full(rows, 9)})
  return batch


def chosen_nll_reference(model, params, batch) -> float:
  """The valid chosen rows' mean negative log-likelihood per answer token, summed over rows, by
  numpy from the logits: the reference of the NLL terms of DPO (RPO) and the reward model."""
  tokens = batch['chosen_tokens']
  logits = np.asarray(model.apply({'params': params}, tokens[:, :-1]), np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
  weights = batch['chosen_weights'][:, 1:]
  nll = -(picked * weights).sum(-1) / weights.sum(-1)
  return float((nll * batch['valid']).sum())


def test_dpo_starts_at_log_2_and_its_gradient_favours_the_chosen_answers():
  cfg = tiny()
  model, params = init(cfg)
  objective = dpo_lib.DPO(run_config('', dpo=dict(beta=0.5, label_smoothing=0.0)))
  loss_fn = objective.loss_fn(model)
  batch = pair_batch(cfg.vocab_size)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None,
                                                                  {'start': params})
  np.testing.assert_allclose(loss / aux['weight'], np.log(2.0), rtol=1e-6)
  # A small gradient step raises the chosen answers' log-probability relative to the rejected.
  moved = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
  rows = dpo_lib.both_sides(batch)
  before, after = (dpo_lib.answer_log_probs(model, p, rows)[0] for p in (params, moved))
  (bc, br), (ac, ar) = dpo_lib.halves(before), dpo_lib.halves(after)
  assert float(jnp.sum((ac - bc) - (ar - br))) > 0


def test_dpos_nll_term_adds_the_chosen_answers_mean_negative_log_likelihood():
  cfg = tiny()
  model, params = init(cfg)
  batch = pair_batch(cfg.vocab_size, rows=3)
  batch['valid'] = np.array([1.0, 1.0, 0.0], np.float32)  # the padding row counts for nothing
  batch['chosen_weights'][1, 6:8] = 0.0                   # answers of different lengths

  def loss(nll_weight):
    objective = dpo_lib.DPO(run_config('', dpo=dict(beta=0.5, nll_weight=nll_weight)))
    return objective.loss_fn(model)(params, batch, None, {'start': params})

  plain, _ = loss(0.0)
  with_nll, aux = loss(0.7)
  expected = chosen_nll_reference(model, params, batch)
  np.testing.assert_allclose(float(aux['sums']['chosen_nll']), expected, rtol=1e-5)
  np.testing.assert_allclose(float(with_nll - plain), 0.7 * expected, rtol=1e-4)


def test_the_reward_models_lm_term_adds_the_chosen_answers_nll_and_keeps_the_scores():
  cfg = tiny()
  model, params = init(cfg, head='both')
  batch = pair_batch(cfg.vocab_size, rows=3)
  batch['valid'] = np.array([1.0, 0.0, 1.0], np.float32)
  batch['chosen_weights'][2, 7:9] = 0.0

  def loss(lm_weight):
    objective = reward_lib.RewardModel(run_config('', reward=dict(lm_weight=lm_weight)))
    return objective.loss_fn(model)(params, batch, None)

  plain, plain_aux = loss(0.0)
  with_lm, aux = loss(0.3)
  # The scalar head's scores are the same whether or not the LM head runs.
  np.testing.assert_allclose(float(aux['sums']['margin']), float(plain_aux['sums']['margin']),
                             rtol=1e-5)
  expected = chosen_nll_reference(model, params, batch)
  np.testing.assert_allclose(float(aux['sums']['chosen_nll']), expected, rtol=1e-5)
  np.testing.assert_allclose(float(with_lm - plain), 0.3 * expected, rtol=1e-4)


def test_sft_gives_no_gradient_through_prompt_tokens():
  cfg = tiny()
  model, params = init(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (4, 17))
  weights = np.zeros((4, 17), np.float32)
  weights[:, 9:] = 1.0  # the answer
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights[:, 1:]}
  loss_fn = step_lib.make_loss_fn(model, dropout=False)
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))
  # Other labels at the prompt's positions: nothing changes.
  relabelled = dict(batch, targets=np.where(batch['weights'] > 0, batch['targets'],
                                            (batch['targets'] + 1) % cfg.vocab_size))
  for a, b in zip(jax.tree.leaves(grad(params, batch)), jax.tree.leaves(grad(params, relabelled))):
    np.testing.assert_array_equal(a, b)


def test_sft_rows_never_mix_each_conversation_scores_as_if_alone():
  """Conversations of different lengths through SFT's own encoding, batching and loss: each row's
  loss is its conversation's computed alone, at its own length with no padding, and the batch's
  is their sum. Packing (a row filled with the next conversation), padding that carries weight
  or leaks into earlier positions, or a model that mixes rows, each changes a row's loss."""
  cfg = tiny(vocab_size=256)  # the byte tokenizer's
  model, params = init(cfg)
  pairs = [('hi', 'hello there'), ('2+2?', '4'), ('name a colour', 'teal'), ('ok?', 'yes')]
  records = [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}
             for q, a in pairs]
  objective = sft_lib.SFT(run_config('', data=dict(seq_len=32)))
  examples = objective.encode(ByteTokenizer(), TEMPLATE, records, 'train')
  batch = sft_lib.as_lm_batch(dict(examples.arrays, valid=np.ones(len(records), np.float32)))

  def weighted_losses(inputs, targets, weights):  # (B,) summed over each row's weighted targets
    logits = model.apply({'params': params}, jnp.asarray(inputs))
    return np.asarray(jnp.sum(step_lib.token_losses(logits, jnp.asarray(targets)) * weights,
                              axis=-1))

  alone = []
  for record in records:
    tokens, weights = chat.encode(ByteTokenizer(), TEMPLATE.pieces(record['messages']))
    assert len(tokens) < 33  # a row has room for it: nothing is cut
    alone.append(weighted_losses(tokens[None, :-1], tokens[None, 1:], weights[None, 1:])[0])
  rows = weighted_losses(batch['inputs'], batch['targets'], batch['weights'])
  np.testing.assert_allclose(rows, alone, rtol=1e-5)
  total, _ = objective.loss_fn(model)(params, batch, None)
  np.testing.assert_allclose(float(total), sum(alone), rtol=1e-5)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_lora_starts_equal_to_its_base_and_adapts_only_its_targets(scan_layers):
  cfg = tiny(pattern='attn*2', scan_layers=scan_layers)
  model = LM(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  base = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params']
  adapters = nn.unbox(lora.init_adapters(boxed['params'], rank=2, rng=jax.random.key(1)))
  paths = {'/'.join(p[:-1]) for p in
           __import__('flax').traverse_util.flatten_dict(adapters)}
  names = {p.split('/')[-1] for p in paths}
  assert names == {'query', 'key', 'value', 'out', 'wi_gate', 'wi_up', 'wo'}
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, cfg.vocab_size)
  merged = lora.merge(base, adapters, rank=2, alpha=4.0)
  np.testing.assert_array_equal(model.apply({'params': merged}, tokens),
                                model.apply({'params': base}, tokens))
  # With B set, W' = W + (alpha / r) A B, for each kernel's own axes (inputs, then outputs).
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)
  merged = lora.merge(base, adapters, rank=2, alpha=4.0)
  flat = __import__('flax').traverse_util.flatten_dict
  fb, fm, fa = flat(base), flat(merged), flat(adapters)
  for path, kernel in fb.items():
    a = fa.get((*path[:-1], 'lora_a'))
    if a is None:
      np.testing.assert_array_equal(fm[path], kernel)  # not a target
      continue
    b = fa[(*path[:-1], 'lora_b')]
    lead = 1 if scan_layers and path[1].startswith('layers_') else 0
    a2 = np.asarray(a).reshape(*a.shape[:lead], -1, a.shape[-1])
    b2 = np.asarray(b).reshape(*b.shape[:lead + 1], -1)
    delta = (a2 @ b2).reshape(kernel.shape)
    np.testing.assert_allclose(fm[path], np.asarray(kernel) + 2.0 * delta, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def sft_run(tmp_path_factory, tfds_dir):
  """A tiny base language model (bytes) and an SFT run on arithmetic demonstrations from it."""
  directory = tmp_path_factory.mktemp('posttrain')
  rng = np.random.default_rng(0)
  sums = [(int(a), int(b)) for a, b in rng.integers(0, 30, (200, 2))]
  sft = write_lines(directory / 'sft.jsonl', [
      json.dumps({'prompt': f'{a}+{b}?', 'response': str(a + b)}) for a, b in sums])
  # Answers against refusals: a difference a tiny model can learn in a few steps.
  pref = write_lines(directory / 'pref.jsonl', [
      json.dumps({'prompt': f'{a}+{b}?', 'chosen': str(a + b), 'rejected': 'no idea'})
      for a, b in sums])
  small = dict(seq_len=32, tokenizer='byte')
  train = dict(eval_every=0, checkpoint_every=0, eval_batch_size=16, lr=3e-3)
  template = dict(system='S:', user='U:', assistant='A:', end_of_turn='\n')
  base = str(directory / 'base')
  train_and_evaluate(run_config(tfds_dir, data=small, train=dict(train, num_steps=10)), base)
  sft_dir = str(directory / 'sft')
  config = run_config(tfds_dir, data=dict(small, path=sft), chat=template,
                      train=dict(train, num_steps=60, objective='sft', init_from=base))
  final = train_and_evaluate(config, sft_dir)
  return dict(base=base, sft=sft_dir, pref=pref, final=final, small=small, train=train,
              template=template, tfds_dir=tfds_dir, directory=directory)


@pytest.fixture(scope='module')
def reward_run(sft_run):
  """A reward model trained from the SFT run on its pairs: (its directory, its final metrics)."""
  r = sft_run
  directory = str(r['directory'] / 'reward')
  final = train_and_evaluate(run_config(
      r['tfds_dir'], data=dict(r['small'], path=r['pref']),
      train=dict(r['train'], num_steps=40, objective='reward', init_from=r['sft'])), directory)
  return directory, final


def test_sft_reward_and_dpo_runs_through_the_one_loop(sft_run, reward_run):
  r = sft_run
  with open(os.path.join(r['sft'], 'metrics.jsonl')) as f:
    losses = [row['train_loss'] for row in map(json.loads, f) if 'train_loss' in row]
  assert losses[-1] < losses[0] - 0.5 and r['final']['val_loss'] < losses[0]
  assert chat.ChatTemplate.load(os.path.join(r['sft'], 'tokenizer')).user == 'U:'

  _, reward = reward_run
  assert reward['val_accuracy'] > 0.5 and reward['val_margin'] > 0

  # DPO with LoRA: only adapters train and are saved; the SFT run stays the frozen base.
  dpo_dir = str(r['directory'] / 'dpo')
  config = run_config(r['tfds_dir'], data=dict(r['small'], path=r['pref']), lora=dict(rank=2),
                      train=dict(r['train'], num_steps=20, objective='dpo', init_from=r['sft'],
                                 log_every=1))
  final = train_and_evaluate(config, dpo_dir)
  with open(os.path.join(dpo_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  np.testing.assert_allclose(rows[0]['train_loss'], np.log(2), rtol=1e-5)  # policy = reference
  assert final['val_reward_margin'] > 0
  saved = os.listdir(os.path.join(dpo_dir, 'checkpoints', '20', 'params'))
  assert saved  # adapters only: the base's kernels are not among the saved parameters
  from train.checkpoint import params_metadata
  names = {p[-1] for p in params_metadata(dpo_dir, 20)}
  assert names == {'lora_a', 'lora_b'}
  tuned, sft = load_run(dpo_dir), load_run(r['sft'])
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned.params),
                                                      jax.tree.leaves(sft.params)))


def test_sample_chat_answers_in_the_template_and_a_base_run_has_none(sft_run):
  """eval.sample --chat prints the greedy answer that eval.respond gives in the template."""
  from eval.respond import chat_prompt, respond
  r, root = sft_run, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def sample(workdir):
    return subprocess.run(
        [sys.executable, '-m', 'eval.sample', f'--workdir={workdir}', '--chat', '--prompt=3+4?',
         '--temperature=0', '--max_new_tokens=4'], cwd=root, capture_output=True, text=True)

  run = load_run(r['sft'])
  eos = int(run.tokenizer.encode(run.template.end_of_turn)[0])
  [answer] = respond(run.model, run.params, [chat_prompt(run.tokenizer, run.template, '3+4?')],
                     max_new_tokens=4, eos_id=eos)
  result = sample(r['sft'])
  assert result.returncode == 0, result.stderr
  assert result.stdout == run.tokenizer.decode(answer) + '\n'
  result = sample(r['base'])
  assert result.returncode == 2 and 'has no chat template' in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# Reinforcement learning (train/objectives/rl.py).


def test_group_advantages_centre_and_scale_each_group():
  rewards = np.asarray([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 2.5]])
  mean = rewards.mean(axis=1, keepdims=True)
  std = rewards.std(axis=1, keepdims=True)
  np.testing.assert_allclose(rl.group_advantages(rewards), (rewards - mean) / (std + 1e-6),
                             rtol=1e-6)
  np.testing.assert_allclose(rl.group_advantages(rewards, scale=False), rewards - mean)


def test_at_ratio_one_the_clipped_loss_is_the_plain_policy_gradient():
  logp = jnp.asarray([-1.0, -2.0, -0.5])
  advantages = jnp.asarray([1.5, -0.7, 0.2])
  loss = lambda lp: jnp.sum(rl.clipped_policy_loss(lp, jax.lax.stop_gradient(logp),
                                                   advantages, 0.2)[0])
  np.testing.assert_allclose(loss(logp), -jnp.sum(advantages), rtol=1e-6)  # ratio 1
  np.testing.assert_allclose(jax.grad(loss)(logp), -advantages, rtol=1e-6)  # -A d log p
  # Past the clip range the clipped term takes over and passes no gradient.
  far = logp + jnp.asarray([0.5, -0.5, 0.5])
  _, clipped = rl.clipped_policy_loss(far, logp, advantages, 0.2)
  np.testing.assert_array_equal(clipped, [1.0, 1.0, 1.0])
  np.testing.assert_allclose(jax.grad(lambda lp: jnp.sum(rl.clipped_policy_loss(
      lp, logp, advantages, 0.2)[0]))(far), [0.0, 0.0, 0.0])


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
  logp = jnp.log(jnp.asarray([0.2, 0.5, 0.3]))
  np.testing.assert_array_equal(rl.k3_kl(logp, logp), np.zeros(3))
  other = jnp.log(jnp.asarray([0.4, 0.4, 0.2]))
  kl = np.asarray(rl.k3_kl(logp, other))
  assert np.all(kl > 0)
  ratio = np.exp(other - logp)  # e^(ref - logp) - (ref - logp) - 1, written out
  np.testing.assert_allclose(kl, ratio - np.log(ratio) - 1, rtol=1e-5)


def test_gae_by_hand():
  # Three tokens, gamma 0.9, lambda 0.5; V = (1, 2, 3), the value after the last token 0.
  rewards, values = [0.0, 1.0, 2.0], [1.0, 2.0, 3.0]
  d2 = 2.0 - 3.0                                     # r + 0.9 * 0 - V
  d1 = 1.0 + 0.9 * 3.0 - 2.0
  d0 = 0.0 + 0.9 * 2.0 - 1.0
  a2 = d2
  a1 = d1 + 0.9 * 0.5 * a2
  a0 = d0 + 0.9 * 0.5 * a1
  advantages, returns = rl.gae(rewards, values, gamma=0.9, lam=0.5)
  np.testing.assert_allclose(advantages, [a0, a1, a2])
  np.testing.assert_allclose(returns, [a0 + 1.0, a1 + 2.0, a2 + 3.0])


def sevens(prompt, response, **fields):
  """A reward a tiny model learns in a few steps: the share of '7's in its answer."""
  del prompt, fields
  return response.count('7') / max(len(response), 1)


def broken(prompt, response, **fields):
  return 1 / 0


def rl_run_config(r, prompts: str, rl_settings: dict, **train):
  """A tiny RL run from the SFT fixture's model on `prompts`, its train.* settings over these."""
  return run_config(
      r['tfds_dir'], data=dict(r['small'], path=prompts), chat=r['template'], rl=rl_settings,
      train=dict(r['train'], init_from=r['sft'], warmup_steps=0, schedule='constant',
                 log_every=2, checkpoint_every=0, **train))


@pytest.mark.slow
def test_grpo_raises_its_reward_and_a_failing_reward_function_names_the_example(sft_run,
                                                                              monkeypatch):
  r = sft_run
  prompts = write_lines(r['directory'] / 'prompts.jsonl', [
      json.dumps({'prompt': f'{a}+{b}?', 'answer': a + b}) for a in range(10) for b in range(8)])
  config = rl_run_config(r, prompts, dict(reward='tests.test_posttrain:sevens', max_new_tokens=6,
                                           group_size=4, num_minibatches=2, beta=0.0),
                         num_steps=24, objective='grpo', lr=3e-3, batch_size=8)
  grpo = str(r['directory'] / 'grpo')
  # Spies: the shapes of the batches each call trains on, the tokens the loop counts for it.
  shapes, counted = [], []
  make_batches, add_call = rl.OnPolicy.batches, Window.add_call

  def recording(self, run, k, step):
    batches, metrics = make_batches(self, run, k, step)
    shapes.append(batches['inputs'].shape)
    return batches, metrics

  monkeypatch.setattr(rl.OnPolicy, 'batches', recording)
  monkeypatch.setattr(Window, 'add_call',
                      lambda self, tokens: counted.append(tokens) or add_call(self, tokens))
  train_and_evaluate(config, grpo)
  monkeypatch.undo()
  # A call: 2 updates (ppo_epochs 1 x 2 minibatches), each on 8 prompts x 4 answers / 2 = 16
  # rows of the prompt and answer less its last token, 32 - 1: 2 x 16 x 31 = 992 tokens.
  assert set(shapes) == {(2, 16, 31)} and counted == [992] * 12
  with open(os.path.join(grpo, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if 'reward' in line]
  rewards = [row['reward'] for row in rows if 'reward' in row]
  assert len(rewards) == 12 and np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1
  assert {'train_kl', 'train_clip_fraction', 'train_entropy', 'rollout_s', 'update_s',
          'response_length'} <= set(rows[-1])

  config.rl.reward = 'tests.test_posttrain:broken'
  with pytest.raises(RewardError, match=r'the reward function failed on step 0, answer 0 '
                                        r'\(prompt .*ZeroDivisionError'):
    train_and_evaluate(config, str(r['directory'] / 'broken'))
  assert not os.path.exists(r['directory'] / 'broken')  # failed before its first checkpoint


@pytest.mark.slow
def test_ppo_against_a_reward_model_scores_each_answer_as_the_model_does_alone(sft_run,
                                                                             reward_run):
  r, (reward_dir, _) = sft_run, reward_run
  prompts = write_lines(r['directory'] / 'rl_prompts.jsonl', [
      json.dumps({'prompt': f'{a}+{b}?', 'answer': a + b}) for a in range(6) for b in range(6)])
  config = rl_run_config(r, prompts, dict(reward_model=reward_dir, max_new_tokens=5, group_size=2,
                                           num_minibatches=2),
                         num_steps=4, objective='ppo', lr=1e-3, batch_size=4)
  final = train_and_evaluate(config, str(r['directory'] / 'ppo'))
  with open(os.path.join(r['directory'], 'ppo', 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert {'train_value_loss', 'train_kl', 'reward', 'reward_std', 'kl_penalty'} <= set(rows[-1])
  assert np.isfinite(final['val_reward'])
  # The reward model is pinned to the step it had when the run began.
  saved = json.load(open(os.path.join(r['directory'], 'ppo', 'config.json')))['rl']
  assert saved['reward_model_step'] == load_run(reward_dir).step
  assert saved['reward_model_fingerprint'] == fingerprint(reward_dir, saved['reward_model_step'])

  # The rollout's batched scoring (prompts and answers of different lengths, padded) against
  # the reward model applied to each answer alone, cut at its last token.
  objective = rl.PPO(config)
  objective._load_reward_model(ByteTokenizer())
  rng = np.random.default_rng(1)
  lengths, new = np.array([3, 6, 4]), np.array([2, 1, 4])  # prompt and answer tokens per row
  tokens = rng.integers(1, 200, (3, 12)).astype(np.int32)
  targets = np.arange(11)[None]
  mask = ((targets >= lengths[:, None] - 1)
          & (targets < (lengths + new)[:, None] - 1)).astype(np.float32)
  batched = objective.rewards(tokens, mask, None, None, 'test')
  reward_model = load_run(reward_dir)
  alone = [float(reward_model.model.apply({'params': reward_model.params},
                                          tokens[i:i + 1, :lengths[i] + new[i]],
                                          head='scalar')[0, -1]) for i in range(3)]
  np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)

  # A run that is not a reward model, refused before the new run writes anything.
  config.rl.reward_model = r['sft']
  with pytest.raises(ConfigError, match='is not a reward model'):
    train_and_evaluate(config, str(r['directory'] / 'not_a_reward_model'))
  assert not os.path.exists(r['directory'] / 'not_a_reward_model')

  for both in (dict(reward='tests.test_posttrain:sevens'), dict(reward_model='')):
    config.rl.update(reward_model=reward_dir, reward='')
    config.rl.update(both)
    with pytest.raises(ConfigError, match='needs one reward'):
      rl.GRPO(config).check()


# ---------------------------------------------------------------------------------------------
# The experiment's task (experiments/posttrain/task.py) and its stages' configs.

def test_the_addition_task_holds_out_its_test_problems_and_labels_pairs_right(tmp_path):
  import collections
  import re
  from ml_collections import ConfigDict
  from experiments.configs import posttrain as posttrain_config
  from experiments.posttrain import task
  from experiments.posttrain.__main__ import stage_config
  cfg = ConfigDict(dict(max_operand=19, num_train=300, num_test=50, seed=3,
                        tfds_data_dir=str(tmp_path)))
  problems = task.load(cfg)
  train = {tuple(p) for p in problems.train}
  assert len(train) == 300 and len({tuple(p) for p in problems.test} | train) == 350
  assert problems.train.min() >= 0 and problems.train.max() <= 19
  with pytest.raises(task.ConfigError, match='make only 400'):
    task.load(ConfigDict(dict(cfg, num_train=390)))

  # The RL prompts are problems no other stage sees; the pairs take every other problem.
  split = task.stage_problems(problems.train, ConfigDict(dict(
      num_demonstrations=100, num_rl_prompts=80, num_pairs=220)))
  as_set = lambda a: {tuple(p) for p in a}
  assert len(split.demonstrations) == 100 and len(split.rl) == 80 and len(split.pairs) == 220
  assert as_set(split.rl).isdisjoint(as_set(split.demonstrations) | as_set(split.pairs))
  assert as_set(split.demonstrations) | as_set(split.rl) | as_set(split.pairs) == train
  for d, r, p in ((250, 80, 10), (100, 80, 221)):
    with pytest.raises(task.ConfigError, match='must fit in task.num_train=300'):
      task.stage_problems(problems.train, ConfigDict(dict(
          num_demonstrations=d, num_rl_prompts=r, num_pairs=p)))

  # Every problem is stated `passes` times, each statement wrong with chance error_rate drawn
  # afresh (so some problem is both right and wrong); equation_share of them are equations.
  lines = '\n'.join(task.documents(problems.train, 0.25, 20, seed=0, passes=3,
                                   equation_share=0.7)).split('\n')
  lines = [line for line in lines if line]
  sums = [tuple(map(int, re.findall(r'\d+', line))) for line in lines]
  assert len(sums) == 900
  stated = {}  # by unordered operands: prose and 'b + a' swap the order
  for a, b, c in sums:
    stated.setdefault(tuple(sorted((a, b))), []).append(a + b == c)
  problems_of = collections.Counter(tuple(sorted((int(a), int(b)))) for a, b in problems.train)
  assert {k: len(v) for k, v in stated.items()} == {k: 3 * n for k, n in problems_of.items()}
  assert any(0 < sum(v) < len(v) for v in stated.values())  # right in one pass, wrong in another
  wrong = np.mean([a + b != c for a, b, c in sums])
  assert 0.18 < wrong < 0.32, wrong
  assert 0.62 < np.mean([' = ' in line for line in lines]) < 0.78
  for r in task.preference_pairs(problems.train, seed=0):
    a, b = map(int, re.findall(r'\d+', r['prompt']))
    assert r['chosen'] == str(a + b) == str(r['answer']) and r['rejected'] != r['chosen']
    assert task.exact_match(**dict(r, response=f" {r['chosen']} ")) == 1.0
    assert task.exact_match(**dict(r, response=r['rejected'])) == 0.0

  # A stage's config: its train.* settings and its rl.* over the experiment's.
  config = posttrain_config.get_config()
  rlhf = stage_config(config, 'rlhf', 'prompts.jsonl', 'runs/sft', 'ppo',
                      rl={'reward_model': 'runs/reward'})
  assert (rlhf.train.objective, rlhf.train.init_from, rlhf.data.path) == (
      'ppo', 'runs/sft', 'prompts.jsonl')
  assert rlhf.train.num_steps == config.stages.rlhf.num_steps
  assert (rlhf.rl.reward_model, rlhf.rl.accuracy) == ('runs/reward', posttrain_config.EXACT_MATCH)
  assert rlhf.rl.group_size == config.rl.group_size and 'rl' not in rlhf.train
  default = task.stage_problems(np.zeros((config.task.num_train, 2)), config.task)  # fits
  assert len(default.rl) == config.task.num_rl_prompts > 0
