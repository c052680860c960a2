"""The CPU default: an 8-layer, 6.3M-parameter model that visibly learns on 2 cores within minutes.

Shaped for self-speculation on a CPU (spec section 2.3): vocab 1024 keeps the shared exit head at about 4% of the
weights, so a draft step through E of 8 layers really costs about E/8 of a full step. LayerSkip on as for
pretraining from scratch: exp depth schedule, exp time schedule, rotational curriculum with R=2 (the calibration
recipe of the benchmark issue). Batch 16 x 256 and learning rate 2e-3: 300 steps take about 5 minutes on 2 cores.
Measured at 300 steps (baseline, held-out perplexity of the last exit): batch 8 at 1e-3 74.7, batch 8 at 3e-3 80.6,
batch 16 at 2e-3 52.5 (a bigram model of the same data: 62)."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']()
  # The model shape, p_max=0.1, the exp depth schedule and the rotational curriculum are base's defaults.
  # Attention tiles of 64 (blockwise attention, the CPU's 'auto'): the score tile stays in cache. Measured train
  # step, plain objective, 2 cores (one run, machine shared): dense 1743 ms, blocks of 512 1728, 128 1478, 64 1412.
  c.model.attention_block = 64
  c.layerskip.time_schedule = 'exp'
  c.layerskip.rotation_period = 2
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.learning_rate = 2e-3
  c.train.log_every = 1  # a metrics row every step: the results' training curves and the tests read each step
  c.checkpoint.preemption_check_every = 1  # CPU processes agree on a stop signal every step (cheap here)
  return c
