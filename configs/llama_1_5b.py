"""The paper's 1.5B model pretrained from scratch: 24 layers, about 1.5B parameters, Llama 2 tokenizer size."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']()
  m = c.model
  m.vocab_size = 32000
  m.hidden_size = 2048
  m.intermediate_size = 6656
  m.num_hidden_layers = 24
  m.num_attention_heads = 16
  m.num_key_value_heads = 16
  m.max_position_embeddings = 4096
  m.dtype = 'bfloat16'
  m.remat_policy = 'save_dots'
  c.layerskip.time_schedule = 'exp'
  c.train.seq_len = 4096
  return c
