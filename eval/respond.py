"""Many prompts answered by a trained run, batched: the chat template's rendering of questions,
and generation that stops at each row's end token.

    answers = respond(run, prompt_tokens, max_new_tokens=8, sampling=Sampling(0.0), eos_id=...)

Prompts of different lengths share one compiled program: every batch is padded to the longest
prompt (and to `batch_size` rows) and `model.decode.generate` reads each row's own prompt before
it samples, so a prompt gets what it would get alone (greedy).
"""

from __future__ import annotations

import jax
import numpy as np

from model.decode import Sampling, generate
from train.chat import ChatTemplate, encode
from train.progress import bar


def chat_prompt(tokenizer, template: ChatTemplate, question: str) -> np.ndarray:
  """The tokens that make a chat model answer `question` (a user turn, then the assistant's
  marker)."""
  return encode(tokenizer, template.prompt([{'role': 'user', 'content': question}]))[0]


def respond(model, params, prompts: list[np.ndarray], *, max_new_tokens: int,
            sampling: Sampling = Sampling(0.0), eos_id: int | None = None, seed: int = 0,
            batch_size: int = 64, what: str = 'generating') -> list[np.ndarray]:
  """Each prompt's new tokens, without the end token and what follows it."""
  lengths = np.asarray([len(p) for p in prompts])
  T, prefix = int(lengths.max()), int(lengths.min())
  padded = np.zeros((len(prompts), T), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  answers = []
  starts = range(0, len(prompts), batch_size)
  for n, start in enumerate(bar(starts, len(starts), what)):
    rows = np.arange(start, start + batch_size) % len(prompts)  # the last batch wraps around
    tokens, new = generate(model, params, padded[rows], jax.random.fold_in(
        jax.random.key(seed), n), max_new_tokens=max_new_tokens, sampling=sampling,
        eos_id=eos_id, prompt_lengths_B=lengths[rows], prefix=prefix)
    tokens, new = np.asarray(tokens), np.asarray(new)
    for r, row in enumerate(rows[:len(prompts) - start]):
      out = tokens[r, lengths[row]:lengths[row] + new[r]]
      if eos_id is not None and eos_id in out:
        out = out[:list(out).index(eos_id)]
      answers.append(out)
  return answers
