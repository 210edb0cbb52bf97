"""Conversations as tokens: the chat template, the JSON-lines formats of demonstrations and
preferences, and their tokenised examples with the loss on the assistant's tokens only.

The template wraps each message in its role's marker and ends it with `end_of_turn`:

    <|user|>\\nWhat is 3 + 4?<|end|>\\n<|assistant|>\\n7<|end|>\\n

An example's tokens carry weights: 1 on the assistant's content and its end-of-turn text (so the
model learns to stop), 0 on everything else (markers, system and user turns). The template is
part of a run, like its tokenizer: it is saved in DIR/tokenizer/chat_template.json and a run that
starts from another (`train.init_from`) takes that run's.

Files are JSON lines, one example per line, in the layouts of the public sets:
  demonstrations (SFT)  {"prompt": str, "response": str}
                        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  preferences           {"prompt": str | messages, "chosen": str | messages,
                         "rejected": str | messages}
where a list of messages for "chosen" is the whole conversation (its last message the answer)
and a string is the assistant's answer to the prompt. Any other field is kept with the example
(e.g. the answer a reward function checks).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import numpy as np

from train.data import DataError

TEMPLATE_FILE = 'chat_template.json'
ROLES = ('system', 'user', 'assistant')


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  system: str = '<|system|>\n'
  user: str = '<|user|>\n'
  assistant: str = '<|assistant|>\n'
  end_of_turn: str = '<|end|>\n'

  @classmethod
  def from_config(cls, section) -> 'ChatTemplate':
    """From the config's `chat` section; backslash escapes there ("\\n" from a command line)
    become the characters they name."""
    return cls(**{f.name: unescape(section[f.name]) for f in dataclasses.fields(cls)})

  def pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a conversation: markers and other roles' turns untrained."""
    out = []
    for m in messages:
      out.append((getattr(self, m['role']), False))
      out.append((m['content'] + self.end_of_turn, m['role'] == 'assistant'))
    return out

  def prompt(self, messages: list[dict]) -> list[tuple[str, bool]]:
    """The pieces that make the model answer: the conversation, then the assistant's marker."""
    return self.pieces(messages) + [(self.assistant, False)]

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, TEMPLATE_FILE), 'w') as f:
      json.dump(dataclasses.asdict(self), f, indent=1)

  @classmethod
  def load(cls, directory: str) -> 'ChatTemplate | None':
    path = os.path.join(directory, TEMPLATE_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return cls(**json.load(f))


def unescape(text: str) -> str:
  """Backslash escapes ("\\n", "\\t") become the characters they name; any other text stays
  as it is (non-Latin-1 characters pass through the escape codec as \\uXXXX)."""
  return text.encode('latin-1', 'backslashreplace').decode('unicode_escape')


def encode(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, weights) of the pieces, each encoded on its own (so a prompt encodes the same
  whether or not an answer follows it). int32 and float32, the same length."""
  tokens, weights = [], []
  for text, trained in pieces:
    ids = tokenizer.encode(text)
    tokens.append(ids)
    weights.append(np.full(len(ids), float(trained), np.float32))
  return (np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32),
          np.concatenate(weights) if weights else np.zeros(0, np.float32))


# ---------------------------------------------------------------------------------------------
# JSON lines.


def files(path: str) -> list[str]:
  """The JSON-lines files at `path`: a file, or every *.jsonl under a directory."""
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, '**', '*.jsonl'), recursive=True))
    if not found:
      raise DataError(f'no *.jsonl files under {path}; put the examples there, one JSON object '
                      f'per line')
    return found
  if not os.path.exists(path):
    raise DataError(f'{path} does not exist; pass a JSON-lines file or a directory of them as '
                    f'--config.data.path')
  return [path]


def read_jsonl(path: str, parse) -> list[Any]:
  """`parse(record, where)` of every non-empty line of the files at `path`; a line that is not a
  JSON object, or that `parse` refuses, is a DataError naming its file and line."""
  examples = []
  for name in files(path):
    with open(name, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f'{name}:{number}'
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f'{where}: not valid JSON ({e.msg}: column {e.colno})') from None
        if not isinstance(record, dict):
          raise DataError(f'{where}: expected a JSON object, got {type(record).__name__}')
        examples.append(parse(record, where))
  if not examples:
    raise DataError(f'{path} holds no examples')
  return examples


def _messages(value, where: str, field: str) -> list[dict]:
  if isinstance(value, str):
    return [{'role': 'user', 'content': value}]
  if not isinstance(value, list) or not value:
    raise DataError(f'{where}: "{field}" must be a string or a non-empty list of messages')
  for m in value:
    if (not isinstance(m, dict) or m.get('role') not in ROLES
        or not isinstance(m.get('content'), str)):
      raise DataError(f'{where}: every message of "{field}" needs a "role" ({", ".join(ROLES)}) '
                      f'and a string "content", got {json.dumps(m)[:80]}')
  return [{'role': m['role'], 'content': m['content']} for m in value]


def parse_demonstration(record: dict, where: str) -> dict:
  """{'messages': [...], **other fields} of an SFT line."""
  extra = {k: v for k, v in record.items() if k not in ('prompt', 'response', 'messages')}
  if 'messages' in record:
    messages = _messages(record['messages'], where, 'messages')
  elif isinstance(record.get('prompt'), (str, list)) and isinstance(record.get('response'), str):
    messages = (_messages(record['prompt'], where, 'prompt')
                + [{'role': 'assistant', 'content': record['response']}])
  else:
    raise DataError(f'{where}: a demonstration needs "prompt" and "response" strings, or '
                    f'"messages"; this line has {sorted(record)}')
  if not any(m['role'] == 'assistant' for m in messages):
    raise DataError(f'{where}: the conversation has no assistant message to learn from')
  return dict(extra, messages=messages)


def parse_preference(record: dict, where: str) -> dict:
  """{'prompt': messages, 'chosen': messages, 'rejected': messages, **other fields}: two whole
  conversations that share the prompt."""
  missing = [k for k in ('prompt', 'chosen', 'rejected') if k not in record]
  if missing:
    raise DataError(f'{where}: a preference needs "prompt", "chosen" and "rejected"; '
                    f'{missing} missing (the line has {sorted(record)})')
  prompt = _messages(record['prompt'], where, 'prompt')
  pair = {}
  for side in ('chosen', 'rejected'):
    value = record[side]
    if isinstance(value, str):
      pair[side] = prompt + [{'role': 'assistant', 'content': value}]
    else:
      conversation = _messages(value, where, side)
      if conversation[-1]['role'] != 'assistant':
        raise DataError(f'{where}: the last message of "{side}" must be the assistant\'s')
      # A whole conversation (its prompt included), or the answer messages alone.
      pair[side] = (conversation if conversation[:len(prompt)] == prompt
                    else prompt + conversation)
  extra = {k: v for k, v in record.items() if k not in ('prompt', 'chosen', 'rejected')}
  return dict(extra, prompt=prompt, **pair)


def parse_prompt(record: dict, where: str) -> dict:
  """{'prompt': messages, **other fields} of a line for reinforcement learning: its "prompt" (a
  string or messages), or the "messages" of a demonstration up to its last assistant turn; the
  other fields (an "answer" to check) go to the reward function."""
  if 'prompt' in record:
    prompt = _messages(record['prompt'], where, 'prompt')
  elif 'messages' in record:
    messages = _messages(record['messages'], where, 'messages')
    while messages and messages[-1]['role'] == 'assistant':
      messages = messages[:-1]
    prompt = messages
  else:
    raise DataError(f'{where}: a prompt needs "prompt" (a string or messages) or "messages"; '
                    f'this line has {sorted(record)}')
  if not prompt or prompt[-1]['role'] == 'assistant':
    raise DataError(f'{where}: the prompt must end with a user (or system) turn')
  extra = {k: v for k, v in record.items() if k not in ('prompt', 'messages', 'response')}
  return dict(extra, prompt=prompt)
