"""Automatic E and d: choose the self-speculative setting from a short calibration on the user's prompts.

The best (E, d) depends on the model (how early an exit agrees with the last one), on the text (code agrees more
than prose) and on the machine (what a draft step costs against a full one, and what a verify of d + 1 rows costs),
so it is measured, not guessed (spec sections 2.4-2.5):

1. Greedy continuations of the calibration prompts, from the early-exit program at E = L (the full model): the
   output every greedy self-speculative setting reproduces.
2. One teacher-forced pass over prompt + continuation gives every exit's argmax at every position (one compiled
   program for all exits). A draft from exit E is accepted exactly when E's argmax equals the last exit's at its
   position and every earlier draft of its round was accepted (the drafts then ran on the output's own prefix), so
   greedy decoding with any (E, d) can be replayed from these agreements, round by round, without running it: its
   rounds, drafts and accepted drafts (exact up to floating-point ties).
3. The early-exit program (on a CPU E is a runtime value: one compile for every E) times a step through E layers,
   EE(E), with AR = EE(L): each batch's fastest of a few runs (a shared machine's noise only adds time), made
   non-decreasing in E (more layers never cost less).
4. Every candidate's modelled ms/token: its replayed rounds, each costing (k + 1) EE(E) + (AR - EE(E)) v(d) for k
   drafts (spec 2.4), over its tokens; v(d) = 1 is the spec's one-row verify.
5. A (d + 1)-row verify is not one row's cost everywhere (on a 2-core CPU a round costs 1.3-2x its layers), so the
   model's best candidate is run for real, with the model's next best E on the same program where E is a runtime
   value (free: d alone makes a program there). Each measurement tells v(d) for its d, the unmeasured d get a line
   through them, every candidate is modelled again, and the refitted model's best is run while it promises to beat
   the fastest measured and the program budget (two d on a CPU, three (E, d) elsewhere) allows. The three fastest
   then run again side by side with a full step, and the fastest of them is the choice: a load that came and went
   between measurements evens out, and its speed-up over autoregressive decoding is measured, not modelled.

On the 8-layer tiny model (300 steps, 4 held-out prompts x 32 tokens, 2-core CPU) this takes 14-19 s, two thirds
of it compiles, and chose E=4 d=2 or E=4 d=3, within the run-to-run noise (about 5%) of the best of a full sweep.

A candidate is a Setting (E, d, confidence threshold). A threshold (a row stops drafting after a draft whose top
probability is below it; the decoder's confidence_threshold) is not replayed here: such a candidate would be judged
by measurement alone. Candidates now all have threshold 0 (off).

Calibration compiles a few programs (the early-exit one, the teacher-forced pass, one per measured d; on GPU/TPU,
where E is static, one per timed exit and per measured (E, d)), which is most of its seconds; for repeated calls
choose once and pass the numbers:

    choice = calibrate.choose(lm, prompts)
    lm.generate(prompts, strategy='self_speculative', exit_layer=choice.exit_layer,
                num_speculations=choice.num_speculations)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerskip_jax.errors import UsageError
from layerskip_jax.inference import generate as generate_lib
from layerskip_jax.inference.cache import check_length
from layerskip_jax.inference.generate import encode_prompts
from layerskip_jax.inference.layout import uses_unstacked_layers

if TYPE_CHECKING:
  from layerskip_jax.api import LoadedModel

DEFAULT_SPECULATIONS = tuple(range(1, 9))
REFINED = 3  # self-speculative programs compiled at most to run candidates for real, one per (E, d) ...
REFINED_RUNTIME_EXIT = 2  # ... or one per d where E is a runtime value (CPU): each runs several E
EXITS_PER_PROGRAM = 3  # where E is a runtime value: the best few E run with each new program
MAX_MEASURED = 12  # candidates run for real at most
FINALISTS = 3  # the fastest measured, run again side by side
REPEATS = 3  # timed runs of each setting: each batch's fastest counts (the noise of a shared machine only adds)
RUNOFF_REPEATS = 5  # the same for the finalists, side by side
TIMED_BATCHES = 4  # at most this many batches of the calibration prompts are timed


class Setting(NamedTuple):
  exit_layer: int
  num_speculations: int
  confidence_threshold: float = 0.0  # 0 = off
  adapt_threshold: bool = False  # drafting stops at a threshold adapted online (the decoder's adapt_threshold)

  def generate_options(self) -> dict[str, Any]:
    options = dict(strategy='self_speculative', exit_layer=self.exit_layer, num_speculations=self.num_speculations)
    if self.confidence_threshold:
      options['confidence_threshold'] = self.confidence_threshold
    if self.adapt_threshold:
      options['adapt_threshold'] = True
    return options


@dataclasses.dataclass
class Choice:
  exit_layer: int
  num_speculations: int
  confidence_threshold: float  # 0.0 = off
  predicted_ms_per_token: float  # as measured in the calibration (decode only, after compilation)
  reason: str  # one sentence: why this setting, with the numbers
  table: list[dict]  # every candidate, best modelled first: see choose()
  autoregressive_ms_per_token: float = 0.0
  seconds: float = 0.0  # the calibration's wall time
  adapt_threshold: bool = False  # adaptive drafting measured faster than fixed d at this (E, d)

  @property
  def setting(self) -> Setting:
    return Setting(self.exit_layer, self.num_speculations, self.confidence_threshold, self.adapt_threshold)

  def as_stats(self) -> dict[str, Any]:
    """What generate()'s stats['auto'] holds."""
    return {
      'exit_layer': self.exit_layer,
      'num_speculations': self.num_speculations,
      'confidence_threshold': self.confidence_threshold,
      'adapt_threshold': self.adapt_threshold,
      'reason': self.reason,
      'predicted_ms_per_token': self.predicted_ms_per_token,
    }


def check_auto(num_layers: int, name: str = 'exit_layer', prefix: str = '') -> None:
  """UsageError unless a model of `num_layers` can be self-speculative (auto's only strategy)."""
  if num_layers < 2:
    raise UsageError(
      f'{prefix}{name}=auto: the model has {num_layers} layer{"" if num_layers == 1 else "s"}; '
      'self-speculative decoding needs at least 2 (E in 1..L-1)'
    )


# --- 2. every exit's agreement with the last one, and replayed rounds ----------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _exit_argmax(graphdef, state, tokens):
  """[L, B, T] int32: every exit's greedy token at every position (one program for all exits; the head runs on one
  exit at a time, so one exit's logits are held at once)."""
  model = nnx.merge(graphdef, state)
  hidden = model.hidden_states(tokens)
  return jax.lax.map(lambda h: jnp.argmax(model.head(h), axis=-1).astype(jnp.int32), hidden)


def exit_argmax(model, rows: Sequence[Sequence[int]]) -> list[np.ndarray]:
  """Per row, int [L, len(row)]: the argmax of exit E = i + 1 at every position of the row, teacher-forced. Rows
  are right-padded to a multiple of 64 (causal attention: padding never changes earlier positions), so that other
  lengths reuse the program."""
  width = min(-(-max(map(len, rows)) // 64) * 64, model.config.max_position_embeddings)
  tokens = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    tokens[i, : len(row)] = row
  graphdef, state = nnx.split(model)
  argmax = np.asarray(_exit_argmax(graphdef, state, jnp.asarray(tokens)))
  return [argmax[:, i, : len(row)] for i, row in enumerate(rows)]


def agreement(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
  """Per row, bool [L, n] for a continuation of n tokens: whether exit E = i + 1 agrees with the last exit at the
  position of continuation token j (which predicts token j + 1; the row's last entry is always True)."""
  argmax = exit_argmax(model, [list(p) + list(c) for p, c in zip(prompts, continuations)])
  out = []
  for a, prompt, continuation in zip(argmax, prompts, continuations):
    window = a[:, len(prompt) : len(prompt) + len(continuation)]
    out.append(window == window[-1:])
  return out


def run_lengths(agree: np.ndarray) -> np.ndarray:
  """Same shape as agree [..., n]: at each position, how many consecutive positions from it on agree."""
  runs = np.zeros(agree.shape, np.int64)
  following = np.zeros(agree.shape[:-1], np.int64)
  for j in range(agree.shape[-1] - 1, -1, -1):
    following = np.where(agree[..., j], following + 1, 0)
    runs[..., j] = following
  return runs


def expected_accepted(runs: np.ndarray, d: int) -> float:
  """Accepted drafts of a round of d drafts starting at a random position of the continuation: the mean of
  min(run, d). At most d, and never smaller for a larger d."""
  return float(np.mean(np.minimum(runs, d))) if runs.size else 0.0


def mean_run(agree: Sequence[np.ndarray]) -> float:
  """The mean length of the maximal runs of agreeing positions (rows of one exit; 0 when none agrees)."""
  agreeing = sum(int(a.sum()) for a in agree)
  runs = sum(int(np.sum(a & ~np.concatenate([[False], a[:-1]]))) for a in agree)
  return agreeing / runs if runs else 0.0


@dataclasses.dataclass
class Replay:
  """Greedy self-speculative decoding of one batch with d drafts, replayed from its rows' run lengths."""

  draft_steps: list[int]  # per round: drafts made by the row that drafted most (the draft loop's iterations)
  drafted: list[int]  # per row
  accepted: list[int]  # per row
  rounds: list[int]  # per row: rounds it took part in

  @property
  def accepted_per_round(self) -> float:
    return sum(self.accepted) / max(sum(self.rounds), 1)


def replay(runs: Sequence[np.ndarray], lengths: Sequence[int], d: int, max_new_tokens: int) -> Replay:
  """The rounds of one batch (rows in lockstep: a round runs while any row is unfinished), as the decoder makes
  them: a row's first token comes from the prefill; each round a row drafts min(d, max_new_tokens - n - 1) tokens
  (never more than it could emit), accepts the leading ones its exit agrees on, and emits them and one more; it
  stops at `lengths` tokens (its continuation: max_new_tokens, or fewer where it generated EOS).
  runs[r]: row r's run lengths of one exit over its continuation; a run reaching past it is cut there."""
  n = [1] * len(runs)
  out = Replay([], [0] * len(runs), [0] * len(runs), [0] * len(runs))
  while any(n[r] < lengths[r] for r in range(len(runs))):
    steps = 0
    for r, row_runs in enumerate(runs):
      if n[r] >= lengths[r]:
        continue
      limit = max(min(d, max_new_tokens - n[r] - 1), 0)
      a = min(int(row_runs[n[r] - 1]) if n[r] - 1 < len(row_runs) else 0, limit)
      steps = max(steps, limit)
      out.drafted[r] += limit
      out.accepted[r] += a
      out.rounds[r] += 1
      n[r] += a + 1
    out.draft_steps.append(steps)
  return out


# --- 3. step costs, 4. the model -----------------------------------------------------------------------------


def _decode_steps(result) -> int:
  """Loop iterations of an autoregressive or early-exit call: the longest row's tokens after its prefill token."""
  return max(max(r['new_tokens'] for r in result.stats['rows']) - 1, 1)


def nondecreasing(values: Sequence[float]) -> list[float]:
  """The closest non-decreasing sequence in least squares (pool adjacent violators): a step through more layers
  never costs less, so a noisy timing that says otherwise is averaged with its neighbours."""
  blocks = []  # [mean, count]
  for v in values:
    blocks.append([float(v), 1])
    while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
      (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
      blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
  return [m for m, n in blocks for _ in range(n)]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
  """(intercept, slope) of the least-squares line through the points, the slope at least 0 (a constant for one
  distinct x, or where the points fall)."""
  xs, ys = np.asarray(xs, float), np.asarray(ys, float)
  if len(set(xs.tolist())) >= 2:
    slope, intercept = np.polyfit(xs, ys, 1)
    if slope >= 0:
      return float(intercept), float(slope)
  return float(np.median(ys)), 0.0


@dataclasses.dataclass
class CostModel:
  """Seconds per decode step of one batch through E layers, steps[E] (steps[L] = AR), and v(d): what a round's
  verify of d + 1 rows through layers [E, L) costs in units of one row's (1 until measurements say otherwise)."""

  steps: dict[int, float]
  num_layers: int
  v_intercept: float = 1.0
  v_slope: float = 0.0
  measured_v: dict[int, float] = dataclasses.field(default_factory=dict)  # per measured d

  def step(self, exit_layer: int) -> float:
    if exit_layer in self.steps:
      return self.steps[exit_layer]
    known = sorted(self.steps)  # exits not timed (static E: each is a compile) lie on the line between neighbours
    return float(np.interp(exit_layer, known, [self.steps[e] for e in known]))

  def v(self, d: int) -> float:
    return self.measured_v.get(d, min(max(self.v_intercept + self.v_slope * d, 0.5), 10.0))

  def seconds(self, setting: Setting, replays: Sequence[Replay], v: float | None = None) -> float:
    """Decode seconds of the replayed batches: per round (k + 1) EE(E) + (AR - EE(E)) v(d) for k drafts."""
    ee, ar = self.step(setting.exit_layer), self.step(self.num_layers)
    v = self.v(setting.num_speculations) if v is None else v
    return sum(sum(k + 1 for k in r.draft_steps) * ee + len(r.draft_steps) * (ar - ee) * v for r in replays)

  def verify_factor(self, setting: Setting, replays: Sequence[Replay], seconds: float) -> float:
    """The v that makes the modelled seconds of `replays` equal the measured `seconds`."""
    ee, ar = self.step(setting.exit_layer), self.step(self.num_layers)
    drafting = sum(sum(k + 1 for k in r.draft_steps) for r in replays) * ee
    verifies = sum(len(r.draft_steps) for r in replays) * max(ar - ee, 1e-9)
    return (seconds - drafting) / verifies

  def refit(self, factors: dict[Setting, float]) -> None:
    """v(d) from measured verify factors: the median over E of each measured d, a line in d for the others."""
    by_d = {}
    for s, v in factors.items():
      by_d.setdefault(s.num_speculations, []).append(v)
    self.measured_v = {d: min(max(float(np.median(v)), 0.5), 10.0) for d, v in by_d.items()}
    self.v_intercept, self.v_slope = fit_line(list(self.measured_v), list(self.measured_v.values()))


# --- choose ------------------------------------------------------------------------------------------------


def _check_choose(lm, rows, max_new_tokens, exit_layers, speculations, batch_size):
  num_layers = lm.num_layers
  check_auto(num_layers)
  exit_layers = list(range(1, num_layers)) if exit_layers is None else list(exit_layers)
  speculations = list(DEFAULT_SPECULATIONS if speculations is None else speculations)
  for name, values in (('exit_layers', exit_layers), ('num_speculations', speculations)):
    if not values:
      raise UsageError(f'{name}: empty; give at least one value')
    for value in values:
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise UsageError(f'{name}: {value!r} is not an integer')
  for e in exit_layers:
    if not 1 <= e < num_layers:
      raise UsageError(
        f'exit_layers: {e} is out of range: must be 1..{num_layers - 1} (E counts the layers run; '
        f'the model has {num_layers})'
      )
  for d in speculations:
    if d < 1:
      raise UsageError(f'num_speculations: {d} is out of range: must be at least 1')
  if max_new_tokens < 2:
    raise UsageError(f'max_new_tokens={max_new_tokens}: calibration needs at least 2 new tokens')
  if not 1 <= batch_size <= len(rows):
    raise UsageError(f'batch_size={batch_size}: must be in 1..{len(rows)} (there are {len(rows)} prompts)')
  vocab = lm.model.config.vocab_size
  for i, row in enumerate(rows):
    if min(row) < 0 or max(row) >= vocab:
      raise UsageError(f'prompts[{i}]: token ids must lie in [0, {vocab})')
  check_length(lm.model.config, max(map(len, rows)), max_new_tokens, max(speculations))
  return sorted({int(e) for e in exit_layers}), sorted({int(d) for d in speculations})


def choose(
  lm: LoadedModel,
  prompts: Sequence,
  *,
  max_new_tokens: int = 32,
  exit_layers: Sequence[int] | None = None,
  num_speculations: Sequence[int] | None = None,
  batch_size: int = 1,
  refine: int | None = None,
  log: Callable[[str], None] | None = print,
) -> Choice:
  """The self-speculative setting fastest on `prompts` (token-id lists, or strings with lm's tokenizer) decoded
  `batch_size` rows at a time, greedy, `max_new_tokens` per row (see the module docstring for how).

  exit_layers / num_speculations: the candidates (default every E in 1..L-1, every d in 1..8); give one value to fix
  it. refine: how many self-speculative programs may be compiled to run candidates for real: one per d where E is
  a runtime value, as on a CPU (default REFINED_RUNTIME_EXIT), one per (E, d) on stacked weights (default REFINED);
  0: the model alone decides, with a one-row verify. log: where the progress line and the choice's reason go (None:
  nowhere). `lm` is an api.LoadedModel (anything with .model, .num_layers, .tokenizer and .generate).

  Choice.table has a row per candidate, best modelled first: exit_layer, num_speculations, confidence_threshold,
  agreement (of exit E with the last), expected_accepted (accepted drafts per round, replayed), acceptance_rate,
  draft_step_ms (EE(E)), modelled_ms_per_token (one-row verify), refitted_ms_per_token (v(d) from the
  measurements), measured_ms_per_token (None where not run).
  """
  begin = time.perf_counter()
  rows = encode_prompts(prompts, getattr(lm, 'tokenizer', None))
  exit_layers, speculations = _check_choose(lm, rows, max_new_tokens, exit_layers, num_speculations, batch_size)
  say = log or (lambda _: None)
  num_layers = lm.num_layers
  starts = range(0, len(rows), batch_size)
  batches = [rows[i : i + batch_size] for i in starts]
  bucket = getattr(generate_lib, 'PROMPT_BUCKET', 1)  # generate() pads prompts to a multiple of this
  shape = lambda batch: (len(batch), -(-max(map(len, batch)) // bucket))
  timed_index = [i for i, b in enumerate(batches) if shape(b) == shape(batches[0])][:TIMED_BATCHES]
  timed = [batches[i] for i in timed_index]  # one shape: one program per setting
  say(
    f'auto: calibrating E and d on {len(rows)} prompt{"s" if len(rows) > 1 else ""} x {max_new_tokens} tokens '
    f'(batch {batch_size}): {len(exit_layers)} E x {len(speculations)} d'
  )

  # 1. the greedy continuations, from the early-exit program at E = L (the full model; also step 3's program)
  early = dict(strategy='early_exit', max_new_tokens=max_new_tokens)
  if all(shape(b) == shape(batches[0]) for b in batches):
    continuations = [t for batch in batches for t in lm.generate(batch, exit_layer=num_layers, **early).tokens]
  else:  # batches of other shapes would each compile: one call for all rows instead
    continuations = lm.generate(rows, exit_layer=num_layers, **early).tokens
    lm.generate(timed[0], exit_layer=num_layers, **early)  # compiles the timed shape
  lengths = [len(c) for c in continuations]
  tokens = max(sum(lengths) - len(rows), 1)  # after each row's prefill token
  timed_tokens = max(sum(lengths[starts[i] + r] - 1 for i in timed_index for r in range(len(batches[i]))), 1)

  # 2. agreement of every exit with the last, replayed rounds of every candidate on every batch
  # the model the decoder ran (on a CPU a bf16 model decodes in float32): its agreement is what the rounds replay
  agree = agreement(lm.decode_model, rows, continuations)
  runs = [run_lengths(a) for a in agree]
  candidates = [Setting(e, d) for e in exit_layers for d in speculations]
  replays = {
    s: [
      replay(
        [runs[r][s.exit_layer - 1] for r in range(i, i + len(b))],
        lengths[i : i + len(b)],
        s.num_speculations,
        max_new_tokens,
      )
      for i, b in zip(starts, batches)
    ]
    for s in candidates
  }

  # 3. a step through E layers (E = L: a full step), repeats interleaved, the fastest of each made non-decreasing in
  # E. Where E is static (stacked weights: GPU/TPU) each exit is a compile: a few exits, and lines between them.
  runtime_exit = uses_unstacked_layers()
  if refine is None:
    refine = REFINED_RUNTIME_EXIT if runtime_exit else REFINED
  if runtime_exit:
    exits = sorted({*exit_layers, num_layers})
  else:
    exits = sorted({exit_layers[0], exit_layers[len(exit_layers) // 2], exit_layers[-1], num_layers})
  seconds = {e: [] for e in exits}
  for _ in range(REPEATS):
    for e in exits:
      results = [lm.generate(batch, exit_layer=e, **early) for batch in timed]
      seconds[e].append([r.stats['decode_seconds'] / _decode_steps(r) for r in results])
  model = CostModel(
    dict(zip(exits, nondecreasing([float(np.mean(np.min(seconds[e], axis=0))) for e in exits]))), num_layers
  )
  ar = model.step(num_layers)
  ar_ms = 1e3 * ar * sum(max(lengths[i : i + len(b)]) - 1 for i, b in zip(starts, batches)) / tokens

  # 4. the modelled ms/token of every candidate on all calibration rows, with a one-row verify
  def row(s: Setting) -> dict[str, Any]:
    rounds = sum(sum(r.rounds) for r in replays[s])
    return {
      'exit_layer': s.exit_layer,
      'num_speculations': s.num_speculations,
      'confidence_threshold': s.confidence_threshold,
      'adapt_threshold': s.adapt_threshold,
      'agreement': float(np.mean(np.concatenate([a[s.exit_layer - 1] for a in agree]))),
      'expected_accepted': sum(sum(r.accepted) for r in replays[s]) / max(rounds, 1),
      'acceptance_rate': sum(sum(r.accepted) for r in replays[s]) / max(sum(sum(r.drafted) for r in replays[s]), 1),
      'draft_step_ms': 1e3 * model.step(s.exit_layer),
      'modelled_ms_per_token': 1e3 * model.seconds(s, replays[s], v=1.0) / tokens,
      'refitted_ms_per_token': None,
      'measured_ms_per_token': None,
    }

  table = {s: row(s) for s in candidates}
  order = sorted(candidates, key=lambda s: table[s]['modelled_ms_per_token'])

  # 5. run the best candidates for real: the model's best; where it needs a program not compiled yet, that program
  # (and, where E is a runtime value, the model's best few E with it); then v(d) refitted from every measurement,
  # and again, until the refitted model's best has been measured or `refine` programs are compiled.
  samples: dict[Setting, list[list[float]]] = {}  # per run, the decode seconds of each timed batch
  factors: dict[Setting, float] = {}
  programs: set = set()
  program = (lambda s: s.num_speculations) if runtime_exit else (lambda s: (s.exit_layer, s.num_speculations))

  def decode_seconds(options: dict[str, Any]) -> list[float]:
    return [lm.generate(b, **options, max_new_tokens=max_new_tokens).stats['decode_seconds'] for b in timed]

  def fastest(runs: list[list[float]]) -> float:
    return float(np.sum(np.min(runs, axis=0)))

  def measure(settings: Sequence[Setting], repeats: int = REPEATS) -> None:
    for s in settings:  # compile (or reuse) first: then the timed runs of the settings are interleaved
      if program(s) not in programs:
        programs.add(program(s))
        lm.generate(timed[0], **s.generate_options(), max_new_tokens=max_new_tokens)
    for _ in range(repeats):
      for s in settings:
        samples.setdefault(s, []).append(decode_seconds(s.generate_options()))
    for s in settings:
      decode = fastest(samples[s])
      table[s]['measured_ms_per_token'] = 1e3 * decode / timed_tokens
      factors[s] = model.verify_factor(s, timed_replays(s), decode)
    model.refit(factors)
    for s in candidates:
      table[s]['refitted_ms_per_token'] = 1e3 * model.seconds(s, replays[s]) / tokens

  timed_replays = lambda s: [replays[s][i] for i in timed_index]
  refitted = lambda s: 1e3 * model.seconds(s, timed_replays(s), v=None if factors else 1.0) / timed_tokens
  while refine > 0 and len(samples) < MAX_MEASURED:
    best = min((s for s in candidates if s not in samples), key=refitted, default=None)
    if best is None or (samples and refitted(best) >= min(table[s]['measured_ms_per_token'] for s in samples)):
      break  # no candidate left that the refitted model expects faster than the fastest measured
    if program(best) in programs:
      measure([best])
      continue
    if len(programs) >= refine:
      break
    same = [s for s in sorted(candidates, key=refitted) if program(s) == program(best) and s not in samples]
    measure(same[:EXITS_PER_PROGRAM])
  # the fastest few measured run again side by side with a full step (E = L), for the figures reported:
  # a load that came and went between the measurements above evens out, and the speed-up is measured, not modelled
  finalists = sorted(samples, key=lambda s: table[s]['measured_ms_per_token'])[:FINALISTS]
  if finalists:  # adaptive drafting (spec 2.5) at the fastest (E, d): a runtime option, no compile; chosen only
    # if it measures faster side by side (on a weak model's exits a threshold only shortens good rounds)
    adaptive = finalists[0]._replace(adapt_threshold=True)
    candidates.append(adaptive)
    table[adaptive] = {**table[finalists[0]], 'adapt_threshold': True, 'refitted_ms_per_token': None}
    finalists.append(adaptive)
  reference = []
  for s in finalists:
    samples[s] = []
  for _ in range(RUNOFF_REPEATS if finalists else 0):
    reference.append(decode_seconds(dict(strategy='early_exit', exit_layer=num_layers)))
    for s in finalists:
      samples[s].append(decode_seconds(s.generate_options()))
  for s in finalists:
    table[s]['measured_ms_per_token'] = 1e3 * fastest(samples[s]) / timed_tokens
  if finalists:
    ar_ms = 1e3 * fastest(reference) / timed_tokens

  measured = [s for s in candidates if s in samples]
  best = min(measured or candidates, key=lambda s: _ms(table[s]))
  runner_up = min((s for s in (measured or candidates) if s != best), key=lambda s: _ms(table[s]), default=None)
  reason = _reason(
    table[best], table[runner_up] if runner_up else None, model, ar_ms, [a[best.exit_layer - 1] for a in agree]
  )
  say(f'auto: {reason}')
  return Choice(
    exit_layer=best.exit_layer,
    num_speculations=best.num_speculations,
    confidence_threshold=best.confidence_threshold,
    adapt_threshold=best.adapt_threshold,
    predicted_ms_per_token=_ms(table[best]),
    reason=reason,
    autoregressive_ms_per_token=ar_ms,
    table=[table[s] for s in order] + [table[s] for s in candidates if s.adapt_threshold],
    seconds=time.perf_counter() - begin,
  )


def _ms(row: dict) -> float:
  return row['measured_ms_per_token'] if row['measured_ms_per_token'] is not None else row['modelled_ms_per_token']


def _reason(best: dict, runner_up: dict | None, model: CostModel, ar_ms: float, agree: Sequence[np.ndarray]) -> str:
  e, d = best['exit_layer'], best['num_speculations']
  run = mean_run(agree)
  runs = f' (runs of {run:.1f} on average)' if run else ''
  numbers = f'{best["modelled_ms_per_token"]:.2f} ms/token modelled'
  if best['measured_ms_per_token'] is not None:
    numbers += f' with a one-row verify, {best["measured_ms_per_token"]:.2f} measured'
  speed = ar_ms / _ms(best)
  verdict = f'{speed:.2f}x autoregressive ({ar_ms:.2f} ms/token)'
  if speed < 1:
    verdict += ', slower: on these prompts prefer strategy autoregressive'
  label = lambda row: (
    f'E={row["exit_layer"]} d={row["num_speculations"]}'
    + (' with an adaptive threshold' if row.get('adapt_threshold') else '')
  )
  text = (
    f'{label(best)}: exit {e} agrees with the last exit on {best["agreement"]:.0%} of tokens{runs}, '
    f'{best["expected_accepted"]:.2f} of {d} drafts accepted per round; a draft step costs '
    f'{best["draft_step_ms"]:.2f} ms against {1e3 * model.step(model.num_layers):.2f} for a full step: '
    f'{numbers}, {verdict}'
  )
  if runner_up is not None:
    measured = ' measured' if runner_up['measured_ms_per_token'] is not None else ' modelled'
    text += f'; {label(runner_up)} next at {_ms(runner_up):.2f}{measured}'
  return text
