"""Llama 2 7B (6,738,415,616 parameters). LayerSkip continual pretraining: constant time schedule."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']()
  m = c.model
  m.vocab_size = 32000
  m.hidden_size = 4096
  m.intermediate_size = 11008
  m.num_hidden_layers = 32
  m.num_attention_heads = 32
  m.num_key_value_heads = 32
  m.max_position_embeddings = 4096
  m.dtype = 'bfloat16'
  m.remat_policy = 'save_proj'  # fits twice the sequences of save_dots per device (train.plan; README)
  c.train.seq_len = 4096
  return c
