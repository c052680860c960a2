"""Llama 3 8B (8,030,261,248 parameters): grouped-query attention 32:8, 128k vocabulary, rope_theta 500000."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']()
  m = c.model
  m.vocab_size = 128256
  m.hidden_size = 4096
  m.intermediate_size = 14336
  m.num_hidden_layers = 32
  m.num_attention_heads = 32
  m.num_key_value_heads = 8
  m.rope_theta = 500000.0
  m.max_position_embeddings = 8192
  m.dtype = 'bfloat16'
  m.remat_policy = 'save_proj'  # fits twice the sequences of save_dots per device (train.plan; README)
  c.train.seq_len = 8192
  return c
