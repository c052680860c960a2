"""Shared fixtures: one small model per test session (compiles are the suite's main cost)."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from layerskip_jax.model import ModelConfig, create  # noqa: E402

SMALL = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.1)


@pytest.fixture(scope='session')
def small_config() -> ModelConfig:
  return SMALL


@pytest.fixture(scope='session')
def small_model():
  """A 4-layer GQA model with large enough weights that layers change the residual stream visibly. Read-only."""
  return create(SMALL, seed=0)
