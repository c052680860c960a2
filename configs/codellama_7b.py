"""CodeLlama 7B (6,738,546,688 parameters): Llama 2 7B with 16 extra infilling tokens and rope_theta 1e6."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']()
  m = c.model
  m.vocab_size = 32016
  m.hidden_size = 4096
  m.intermediate_size = 11008
  m.num_hidden_layers = 32
  m.num_attention_heads = 32
  m.num_key_value_heads = 32
  m.rope_theta = 1000000.0
  m.max_position_embeddings = 16384
  m.dtype = 'bfloat16'
  m.remat_policy = 'save_proj'  # fits twice the sequences of save_dots per device (train.plan; README)
  c.train.seq_len = 4096
  return c
