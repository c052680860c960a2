"""Llama 2 13B (13,015,864,320 parameters). LayerSkip continual pretraining: constant time schedule."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']()
  m = c.model
  m.vocab_size = 32000
  m.hidden_size = 5120
  m.intermediate_size = 13824
  m.num_hidden_layers = 40
  m.num_attention_heads = 40
  m.num_key_value_heads = 40
  m.max_position_embeddings = 4096
  m.dtype = 'bfloat16'
  m.remat_policy = 'full'
  c.train.seq_len = 4096
  return c
