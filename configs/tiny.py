"""The CPU default: an 8-layer, 6.3M-parameter model that visibly learns on 2 cores within minutes.

Shaped for self-speculation on a CPU (spec section 2.3): vocab 1024 keeps the shared exit head at about 4% of the
weights, so a draft step through E of 8 layers really costs about E/8 of a full step. LayerSkip on as for
pretraining from scratch: exp depth schedule, exp time schedule, rotational curriculum."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']()
  # The model shape, p_max=0.1, the exp depth schedule and the rotational curriculum (R=4) are base's defaults.
  c.layerskip.time_schedule = 'exp'
  c.train.steps = 300
  return c
