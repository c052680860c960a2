"""Llama 3.2 1B (1,235,814,400 parameters): tied embeddings, llama3 rope scaling, 128k context."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']()
  m = c.model
  m.vocab_size = 128256
  m.hidden_size = 2048
  m.intermediate_size = 8192
  m.num_hidden_layers = 16
  m.num_attention_heads = 32
  m.num_key_value_heads = 8
  m.head_dim = 64
  m.rope_theta = 500000.0
  m.rope_scaling.rope_type = 'llama3'
  m.rope_scaling.factor = 32.0
  m.rope_scaling.low_freq_factor = 1.0
  m.rope_scaling.high_freq_factor = 4.0
  m.rope_scaling.original_max_position_embeddings = 8192
  m.max_position_embeddings = 131072
  m.tie_word_embeddings = True
  m.dtype = 'bfloat16'
  m.remat_policy = 'save_proj'  # 5.5 GiB of temporaries per 8192-token sequence (save_dots 14.5, full 3.2)
  c.train.seq_len = 8192
  return c
