"""Invalid configurations fail at construction, naming the field and the fix."""

import pytest

from model import ModelConfig
from model.config import ConfigError, check_context
from tests.conftest import tiny


@pytest.mark.parametrize('kw, message', [
    (dict(d_model=30, num_heads=4), r'model.d_model=30 is not divisible by model.num_heads=4'),
    (dict(num_heads=4, num_kv_heads=3), r'model.num_heads=4 is not divisible by '
                                        r'model.num_kv_heads=3'),
    (dict(d_model=36, num_heads=4, position='rope'), r'needs an even head width, got head width 9'),
    (dict(pattern='attn*2,lstm'), r"unknown mixer 'lstm'"),
    (dict(position='xpos'), r"model.position='xpos' is not known; choose one of"),
    (dict(norm='batchnorm'), r"model.norm='batchnorm' is not known"),
    (dict(activation='tanh'), r"model.activation='tanh' is not known"),
    (dict(dropout=1.0), r'model.dropout must be in \[0, 1\)'),
])
def test_invalid_config_raises_naming_field_and_fix(kw, message):
  with pytest.raises(ConfigError, match=message):
    tiny(**kw)


def test_context_longer_than_the_learned_table():
  cfg = tiny(position='learned', max_len=32)
  check_context(cfg, 32)
  with pytest.raises(ConfigError, match=r'longer than the learned position table '
                                        r'\(model.max_len=32\); raise model.max_len'):
    check_context(cfg, 33, 'data.seq_len')
  check_context(tiny(position='rope', max_len=32), 1000)  # other schemes have no table


def test_unknown_keys_are_rejected_with_the_valid_ones():
  with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['model.widht'\]"):
    ModelConfig.from_dict({'widht': 3})
  with pytest.raises(ConfigError, match=r"\['model.moe.experts'\]"):
    ModelConfig.from_dict({'moe': {'experts': 3}})


def test_from_dict_round_trips():
  cfg = tiny(num_kv_heads=2, position='alibi')
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize('section, field, value, message', [
    ('train', 'log_every', 0, r'train.log_every=0 must be a whole number >= 1'),
    ('train', 'num_steps', -5, r'train.num_steps=-5 must be a whole number >= 1'),
    ('train', 'grad_accum_steps', 5, r'train.grad_accum_steps=5 does not divide '
                                     r'train.batch_size=32'),
    ('train', 'schedule', 'bogus', r"train.schedule='bogus' is not known; choose one of "
                                   r"\['cosine', 'linear', 'constant'\]"),
    ('train', 'b2', 1.0, r'train.b2=1.0 must be a number in \[0.0, 1.0\)'),
    ('train', 'lr', -1e-3, r'train.lr=-0.001 must be a number >= 0.0'),
    ('train', 'eval_every', -1, r'train.eval_every=-1 must be a whole number >= 0'),
    ('train', 'keep_checkpoints', 0, r'train.keep_checkpoints=0 must be a whole number >= 1'),
    ('data', 'tokenizer', 'words', r"data.tokenizer='words' is not known"),
    ('data', 'seq_len', 0, r'data.seq_len=0 must be a whole number >= 1'),
    ('data', 'val_fraction', 1.0, r'data.val_fraction=1.0 must be a number in \[0.0, 1.0\)'),
    ('data', 'path', '', r'no corpus configured'),
])
def test_invalid_train_and_data_values_name_the_field(section, field, value, message):
  from experiments.configs import base
  from train.config import check_run_config
  config = base.get_config()
  config.data.path = 'corpus.txt'
  check_run_config(config)  # the defaults are valid
  config[section][field] = value
  with pytest.raises(ConfigError, match=message):
    check_run_config(config)


def test_a_sentencepiece_tokenizer_needs_a_vocabulary_size():
  from experiments.configs import base
  from train.config import check_run_config
  config = base.get_config()
  config.data.update(path='corpus.txt', tokenizer='bpe')
  with pytest.raises(ConfigError, match=r"data.tokenizer='bpe' needs data.vocab_size"):
    check_run_config(config)
