"""python -m eval.sample --workdir=DIR --prompt="ROMEO:" [--chat] [--temperature --top_k
--top_p --max_new_tokens --num_samples --seed --stop --step] [--draft_workdir=DRAFT
--num_draft=K] [--config.x.y=...]

Prints the prompt and its continuation, generated with the KV cache (per-layer decoding state).
Temperature 0 is greedy and deterministic. With --chat (a post-trained run, which stores its chat
template), the prompt is a user's message: the model reads it in the template and answers until
its end of turn, and only the answer is printed. With --draft_workdir (a smaller run with the same
tokenizer), samples are drawn by speculative decoding (model/speculative.py), from the same
distribution, and the acceptance rate and tokens/s are printed after them. --config is the run's
own config, whose values `--config.x.y=...` overrides.
"""

from absl import flags

from train import cli

flags.DEFINE_integer('step', None, 'Checkpoint step to sample from (default: the latest).')
flags.DEFINE_string('prompt', '\n', 'Text to continue (with --chat: the user\'s message).')
flags.DEFINE_bool('chat', False, 'Answer the prompt as a user\'s message in the run\'s chat '
                  'template, stopping at its end of turn.')
flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0: all.', lower_bound=0)
flags.DEFINE_float('top_p', 1.0, 'Sample among the smallest set of tokens with this much '
                   'probability (nucleus); 1: all.')
flags.DEFINE_integer('max_new_tokens', 500, 'Tokens to generate at most.', lower_bound=1)
flags.DEFINE_integer('num_samples', 1, 'Continuations to generate (one batch).', lower_bound=1)
flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.DEFINE_string('stop', None, 'Stop a sample at this token (text that encodes to one '
                    'token, e.g. "\\n"); default: the tokenizer\'s end-of-text, if it has one.')
flags.DEFINE_string('draft_workdir', None, 'Work directory of a smaller run with the same '
                    'tokenizer: sample by speculative decoding with it as the draft.')
flags.DEFINE_integer('num_draft', 4, 'With --draft_workdir: tokens the draft proposes per round.',
                     lower_bound=1)



def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from model.decode import Sampling, generate
  from train.restore import load_run, same_tokenizer
  from model.config import check_context
  from train.chat import encode, unescape
  from train.tokenizers import TokenizerError
  f = flags.FLAGS
  sampling = Sampling(f.temperature, f.top_k, f.top_p)
  run = load_run(f.workdir, f.step, f.config)
  draft = None
  if f.draft_workdir:
    draft = load_run(f.draft_workdir)
    if not same_tokenizer(f.workdir, f.draft_workdir):
      raise TokenizerError(f'the draft {f.draft_workdir} has another tokenizer than {f.workdir} '
                           f'({draft.tokenizer.kind}, {draft.tokenizer.vocab_size} tokens vs '
                           f'{run.tokenizer.kind}, {run.tokenizer.vocab_size}); speculative '
                           f'decoding needs the same one')
  if not f.prompt:
    raise TokenizerError('the prompt is empty; give at least one character to continue')
  stop = run.tokenizer.eos_id
  if f.chat:
    if run.template is None:
      raise TokenizerError(f'{f.workdir} has no chat template (a pretraining run); --chat needs a '
                           f'run post-trained with a chat template (sft, reward, dpo, grpo, ppo)')
    prompt = encode(run.tokenizer, run.template.prompt([{'role': 'user', 'content': f.prompt}]))[0]
    stop = int(run.tokenizer.encode(run.template.end_of_turn)[0])
  else:
    prompt = run.tokenizer.encode(f.prompt)
  check_context(run.model_cfg, len(prompt) + f.max_new_tokens,
                'the prompt plus --max_new_tokens')
  model = run.model
  context = run.config.data.seq_len
  if len(prompt) + f.max_new_tokens > context and not run.model_cfg.attention_window:
    # Past its training context a model meets position offsets it never saw; like nanoGPT's
    # cropping, attend to the last `context` tokens only.
    model = type(model)(run.model_cfg.replace(attention_window=context))
  if f.stop is not None:
    ids = run.tokenizer.encode(unescape(f.stop))  # "\\n" names a newline
    if len(ids) != 1:
      raise TokenizerError(f'--stop={f.stop!r} encodes to {len(ids)} tokens; it must be one')
    stop = int(ids[0])
  prompts = jnp.asarray(np.tile(prompt[None], (f.num_samples, 1)), jnp.int32)
  if draft is None:
    tokens, _ = generate(model, run.params, prompts, jax.random.key(f.seed),
                         max_new_tokens=f.max_new_tokens, sampling=sampling, eos_id=stop)
  else:
    tokens, report = _speculative(model, run, draft, prompts, sampling, stop)
  for row in np.asarray(tokens):
    new = row[len(prompt):].tolist()
    if stop is not None and stop in new:
      # The end of text or of a turn is not printed; a --stop token is.
      new = new[:new.index(stop) + (0 if f.chat or stop == run.tokenizer.eos_id else 1)]
    print(run.tokenizer.decode(new) if f.chat else f.prompt + run.tokenizer.decode(new))
    if f.num_samples > 1:
      print('-' * 40)
  if draft is not None:
    print(report)


def _speculative(model, run, draft, prompts, sampling, stop):
  """Samples one at a time (speculative decoding takes batch 1): (tokens, a report line of the
  acceptance rate and of tokens/s, compilation excluded)."""
  import time

  import jax
  import numpy as np

  from model.speculative import speculative_generate
  f = flags.FLAGS
  draft_model = draft.model
  if model.config.attention_window and not draft.model_cfg.attention_window:
    draft_model = type(draft_model)(draft.model_cfg.replace(
        attention_window=model.config.attention_window))
  decode = jax.jit(lambda tp, dp, prompt, rng: speculative_generate(
      model, tp, draft_model, dp, prompt, rng, max_new_tokens=f.max_new_tokens,
      num_draft=f.num_draft, sampling=sampling, eos_id=stop))
  compiled = decode.lower(run.params, draft.params, prompts[:1], jax.random.key(0)).compile()
  rows, made, drafted, accepted = [], 0, 0, 0
  start = time.perf_counter()
  for i in range(prompts.shape[0]):
    tokens, new, d, a = jax.block_until_ready(compiled(
        run.params, draft.params, prompts[i:i + 1], jax.random.key(f.seed + i)))
    rows.append(np.asarray(tokens[0]))
    made, drafted, accepted = made + int(new[0]), drafted + int(d), accepted + int(a)
  seconds = time.perf_counter() - start
  return np.stack(rows), (f'speculative decoding (draft {f.draft_workdir}, K={f.num_draft}): '
                          f'acceptance {accepted / max(drafted, 1):.3f} ({accepted} of {drafted} '
                          f'drafted tokens), {made / seconds:.1f} tokens/s')


if __name__ == '__main__':
  cli.command(main, 'Work directory of a training run.', config=cli.RUN_CONFIG)
