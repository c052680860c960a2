"""The KVQ cache and the samplers: greedy self-speculative == autoregressive, sampling is exact, EOS, batching."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from layerskip_jax.errors import UsageError
from layerskip_jax.inference import decode
from layerskip_jax.inference.cache import init_cache
from layerskip_jax.inference.generate import generate
from layerskip_jax.model import ModelConfig, create

CONFIG = ModelConfig(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  initializer_range=0.3,
  max_position_embeddings=256,
)


@pytest.fixture(scope='module')
def model():
  return create(CONFIG, seed=0)  # large weights: clear logit margins (the spec's tie rule)


def _prompts(batch, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, 128, rng.randint(3, 12)).tolist() for _ in range(batch)]


def test_cached_decoding_equals_a_full_forward(model):
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 20)), jnp.int32)
  full = model(tokens)
  cache_k, cache_v = init_cache(CONFIG, 2, 32)
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  x, cache_k, cache_v, _ = model.run_cached(model.embed(tokens[:, :12]), positions, cache_k, cache_v)
  np.testing.assert_allclose(model.head(x), full[:, :12], atol=1e-4)
  for t in range(12, 20):  # then one token at a time, and a split [0, 2) + [2, L) pass
    pos = jnp.full((2, 1), t)
    x, cache_k, cache_v, _ = model.run_cached(model.embed(tokens[:, t : t + 1]), pos, cache_k, cache_v, stop=2)
    x, cache_k, cache_v, _ = model.run_cached(x, pos, cache_k, cache_v, start=2)
    np.testing.assert_allclose(model.head(x)[:, 0], full[:, t], atol=1e-4)


@pytest.mark.parametrize('batch', [1, 4])
def test_greedy_self_speculative_equals_autoregressive(model, batch):
  prompts = _prompts(batch, seed=batch)
  reference = generate(model, prompts, strategy='autoregressive', max_new_tokens=24)
  assert all(len(t) == 24 for t in reference.tokens)
  before = decode.decode_loop._cache_size()
  for exit_layer in range(1, CONFIG.num_hidden_layers):
    for d in range(1, 9):
      result = generate(
        model, prompts, strategy='self_speculative', exit_layer=exit_layer, num_speculations=d, max_new_tokens=24
      )
      assert result.tokens == reference.tokens, (exit_layer, d)
      s = result.stats
      for row in s['rows']:
        # at most d drafts a round (fewer near max_new_tokens: never a draft that could not be emitted); a round
        # emits its accepted drafts and one token: every generated token after the first (prefill's) is counted
        assert row['drafted'] <= d * row['rounds'], (exit_layer, d, row)
        assert 0 <= row['accepted'] <= row['drafted']
        assert row['new_tokens'] == 1 + row['rounds'] + row['accepted']
      # KVQ reuse: every layer processes the same rows (the drafts and the token before them, per round), so the
      # first E layers never run again for verification and no accepted token passes any layer twice
      rows = s['layer_rows']
      assert len(set(rows)) == 1 and rows[0] == s['drafted'] + s['rounds']
  assert decode.decode_loop._cache_size() - before <= 8  # E is a runtime value; one program per d (the d bucket)
  # One shared program for every d up to a bucket, and drafting that stops early: same tokens.
  before = decode.decode_loop._cache_size()
  for d, options in [
    (2, {}),
    (5, {}),
    (3, dict(confidence_threshold=1.0)),
    (4, dict(adapt_threshold=True)),
    (4, dict(confidence_threshold=0.9, adapt_threshold=True)),
  ]:
    result = generate(
      model,
      prompts,
      strategy='self_speculative',
      exit_layer=2,
      num_speculations=d,
      max_new_tokens=24,
      max_speculations=8,
      **options,
    )
    assert result.tokens == reference.tokens, (d, options)
    if options.get('confidence_threshold') == 1.0:  # only a draft of probability 1.0 (f32) lets a row go on
      assert result.stats['drafted'] < 3 * result.stats['rounds'], result.stats
  assert decode.decode_loop._cache_size() - before <= 1
  # The same on the stacked-weights program (the GPU/TPU default; on a CPU the layers are stored unstacked).
  for strategy, options in [
    ('autoregressive', {}),
    ('self_speculative', dict(exit_layer=2, num_speculations=3)),
    ('self_speculative', dict(exit_layer=1, num_speculations=2, adapt_threshold=True)),
  ]:
    stacked = generate(model, prompts, strategy=strategy, max_new_tokens=24, unstack_layers=False, **options)
    assert stacked.tokens == reference.tokens, strategy


def test_greedy_self_speculative_equals_autoregressive_in_bfloat16():
  """A bf16 model: self-speculative and autoregressive greedy decoding choose the same tokens for every prompt and
  setting. On a CPU the decode path computes in float32 (generate.cpu_decode_model): in bf16 arithmetic a 4-row
  verify and a one-row step parted on these prompts at a 0.6% top-2 margin (bf16 rounds at 0.4%). Accelerators
  keep bf16 compute; their verify can part from one-row steps only at such near-ties."""
  model = create(CONFIG.replace(dtype='bfloat16', param_dtype='bfloat16'), seed=0)
  for prompt in _prompts(4, seed=7):
    reference = generate(model, [prompt], strategy='autoregressive', max_new_tokens=24).tokens
    for exit_layer, d in [(1, 3), (2, 4), (3, 2), (1, 8), (3, 1)]:
      result = generate(
        model, [prompt], strategy='self_speculative', exit_layer=exit_layer, num_speculations=d, max_new_tokens=24
      )
      assert result.tokens == reference, (prompt, exit_layer, d)


def test_early_exit_at_the_last_layer_is_autoregressive(model):
  prompts = _prompts(3)
  reference = generate(model, prompts, strategy='autoregressive', max_new_tokens=16)
  assert generate(model, prompts, strategy='early_exit', exit_layer=4, max_new_tokens=16).tokens == reference.tokens
  early = generate(model, prompts, strategy='early_exit', exit_layer=1, max_new_tokens=16)
  assert early.tokens != reference.tokens  # exit 1 is another model


def test_eos_stops_each_row(model):
  prompts = _prompts(3, seed=5)
  reference = generate(model, prompts, strategy='autoregressive', max_new_tokens=20).tokens
  eos = reference[0][3]
  for kwargs in (dict(strategy='autoregressive'), dict(strategy='self_speculative', exit_layer=2, num_speculations=5)):
    result = generate(model, prompts, max_new_tokens=20, eos_ids=[eos, 127], **kwargs)
    for row, ref in zip(result.tokens, reference):
      stop = next((i for i, t in enumerate(ref) if t in (eos, 127)), None)
      assert row == (ref[: stop + 1] if stop is not None else ref)
    assert result.tokens[0][-1] == eos and len(result.tokens[0]) <= 4


def _exact_marginals(model, prompt, steps):
  """P(token i = v) for i < steps under the full model, by enumerating continuations (tiny vocabulary)."""
  vocab = model.config.vocab_size
  paths = {(): 1.0}
  marginals = []
  for _ in range(steps):
    prefixes = list(paths)
    logits = model(jnp.asarray([prompt + list(p) for p in prefixes]))[:, -1]
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    new, marginal = {}, np.zeros(vocab)
    for prefix, p in zip(prefixes, probs):
      for v in range(vocab):
        new[prefix + (v,)] = paths[prefix] * p[v]
        marginal[v] += paths[prefix] * p[v]
    paths = new
    marginals.append(marginal)
  return marginals


def test_self_speculative_sampling_matches_the_full_model():
  small = ModelConfig(
    vocab_size=6,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    initializer_range=0.5,
    max_position_embeddings=64,
  )
  model = create(small, seed=3)
  prompt = [1, 4, 2]
  draft = np.asarray(jax.nn.softmax(model(jnp.asarray([prompt]), exit_layer=1)[0, -1]))
  full = np.asarray(jax.nn.softmax(model(jnp.asarray([prompt]))[0, -1]))
  assert 0.5 * np.abs(draft - full).sum() > 0.15  # the draft distribution clearly differs from the full model's
  n = 6000
  result = generate(
    model,
    [prompt] * n,
    strategy='self_speculative',
    exit_layer=1,
    num_speculations=3,
    max_new_tokens=3,
    temperature=1.0,
    seed=11,
  )
  assert 0.2 < result.stats['acceptance_rate'] < 0.95
  samples = np.asarray(result.tokens)  # [n, 3]; tokens 2 and 3 come from draft/verify rounds
  exact = _exact_marginals(model, prompt, 3)
  critical = 20.5  # chi-square, 5 degrees of freedom, p = 0.001
  for i in (1, 2):
    counts = np.bincount(samples[:, i], minlength=6)
    expected = n * exact[i]
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < critical, (i, counts, expected)


def test_sampling_filters(model):
  result = generate(model, _prompts(2), strategy='autoregressive', max_new_tokens=8, temperature=0.7, top_k=1)
  greedy = generate(model, _prompts(2), strategy='autoregressive', max_new_tokens=8)
  assert result.tokens == greedy.tokens  # top_k=1 is greedy
  a = generate(
    model, _prompts(2), strategy='self_speculative', exit_layer=2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1
  )
  b = generate(
    model, _prompts(2), strategy='self_speculative', exit_layer=2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1
  )
  assert a.tokens == b.tokens  # seeded


def _reference_probabilities(logits, temperature, top_k, top_p):
  """The filters written plainly, per row in numpy: top-k (ties with the k-th kept), then top-p over what is left."""
  out = []
  for row in np.asarray(logits, np.float64) / max(temperature, 1e-6):
    keep = np.ones_like(row, bool)
    if top_k > 0:
      keep &= row >= np.sort(row)[::-1][min(top_k, row.size) - 1]
    probs = np.where(keep, np.exp(row - row.max()), 0.0)
    probs /= probs.sum()
    order = np.argsort(-row, kind='stable')
    before = np.cumsum(probs[order]) - probs[order]
    cut = row[order][(before < top_p) & keep[order]].min()
    keep &= row >= cut
    probs = np.where(keep, np.exp(row - row.max()), 0.0)
    out.append(probs / probs.sum())
  return np.stack(out)


@pytest.mark.parametrize(
  'temperature,top_k,top_p',
  [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (1.3, 20, 0.5), (1.0, 1, 1.0), (1.0, 5000, 0.999)],
)
def test_sampling_probabilities_match_a_plain_reference(temperature, top_k, top_p):
  """One sort at most (none with both filters off): the same distribution as the filters written plainly, ties at
  the k-th logit included."""
  from layerskip_jax.inference.sampling import probabilities

  logits = np.random.RandomState(0).randn(3, 512).astype(np.float32) * 3
  logits[1, :40] = logits[1].max()  # a tie across the top-k cut
  got = probabilities(jnp.asarray(logits), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  np.testing.assert_allclose(np.asarray(got), _reference_probabilities(logits, temperature, top_k, top_p), atol=2e-6)


def test_sampling_sorts_once_and_only_when_filtering():
  import re
  from layerskip_jax.inference.sampling import probabilities

  hlo = jax.jit(probabilities).lower(jnp.zeros((2, 512)), jnp.float32(1), jnp.int32(0), jnp.float32(1)).compile()
  text = hlo.as_text()
  assert len(re.findall(r' sort\(', text)) == 1 and len(re.findall(r' conditional\(', text)) == 1


@pytest.mark.parametrize(
  'kwargs,message',
  [
    (dict(max_new_tokens=250), 'exceeds the model\'s max_position_embeddings=256'),
    (dict(strategy='self_speculative', exit_layer=4), 'exit_layer=4: must be in 1..3'),
    (dict(strategy='early_exit', exit_layer=0), 'exit_layer=0: must be in 1..4'),
    (dict(strategy='self_speculative', exit_layer=2, num_speculations=0), 'num_speculations=0: must be at least 1'),
    (dict(prompts=[[]]), r'prompts\[0\]: empty'),
    (dict(prompts=['some text']), 'text needs a tokenizer'),
    (dict(strategy='beam'), "strategy='beam': must be one of"),
    (dict(max_new_tokens=2.5), 'max_new_tokens=2.5: must be an integer'),
    (dict(strategy='self_speculative', exit_layer=2, confidence_threshold=1.5), 'confidence_threshold=1.5: must be'),
    (
      dict(strategy='self_speculative', exit_layer=2, num_speculations=4, max_speculations=2),
      'max_speculations=2: the d bucket must hold d',
    ),
    (dict(strategy='self_speculative', exit_layer=2, adapt_threshold='yes'), 'adapt_threshold=.yes.: must be True'),
  ],
)
def test_bad_input(model, kwargs, message):
  kwargs = {'prompts': _prompts(1), **kwargs}
  with pytest.raises(UsageError, match=message):
    generate(model, kwargs.pop('prompts'), **kwargs)


def test_generate_command_line(tmp_path):
  from flax import nnx

  from layerskip_jax import checkpoint_dir, config as config_lib

  config = config_lib.load(
    'tiny',
    {
      'model.num_hidden_layers': 2,
      'model.hidden_size': 64,
      'model.num_attention_heads': 4,
      'model.intermediate_size': 64,
    },
  )
  from layerskip_jax.model import ModelConfig as MC

  params = nnx.to_pure_dict(nnx.state(create(MC.from_config(config.model)), nnx.Param))
  checkpoint_dir.write_params_dir(tmp_path / 'ckpt', config, params)
  run = lambda *a: subprocess.run(
    [sys.executable, '-m', 'layerskip_jax.generate', '--ckpt', str(tmp_path / 'ckpt'), *a],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  ok = run('--prompt', '1 5 9', '--strategy', 'self_speculative', '--exit_layer', '1', '--max_new_tokens', '5')
  assert ok.returncode == 0, ok.stderr
  assert len(ok.stdout.splitlines()[0].split()) == 5 and 'acceptance' in ok.stdout
  text = run('--prompt', 'hello world', '--strategy', 'autoregressive')
  assert text.returncode == 2 and 'has no tokenizer' in text.stderr
  bad = run('--prompt', '1 2', '--strategy', 'self_speculative', '--exit_layer', '2')
  assert bad.returncode == 2 and 'exit_layer=2: must be in 1..1' in bad.stderr and 'Traceback' not in bad.stderr


def _lowered_decode_loop(model, unstack: bool, exit_layer: int = 1, d: int = 2) -> str:
  """The StableHLO text of the greedy self-speculative decode program, as generate() would compile it."""
  from flax import nnx

  from layerskip_jax.inference.generate import Drafting, Sampling, cpu_decode_model

  model = cpu_decode_model(model) if unstack else model
  graphdef, params = nnx.split(model)
  layer_params = model.unstacked_layers() if unstack else None
  static = dict(
    strategy='self_speculative',
    max_new=8,
    d_max=d,
    greedy=True,
    eos_ids=(),
    static_exit=None if unstack else exit_layer,
  )
  sampling = Sampling(jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
  drafting = Drafting(jnp.float32(0.0), jnp.bool_(False))
  tokens, lengths = jnp.ones((1, 8), jnp.int32), jnp.asarray([8], jnp.int32)
  state = decode.prefill(
    graphdef,
    params,
    layer_params,
    tokens,
    lengths,
    exit_layer,
    sampling,
    drafting,
    jax.random.key(0),
    cache_len=8 + 8 + d + 1,
    **static,
  )
  return decode.decode_loop.lower(
    graphdef, params, layer_params, state, exit_layer, d, sampling, drafting, **static
  ).as_text()


def test_accelerator_decode_program_has_no_per_layer_conditional():
  """The stacked-weights program (GPU/TPU): E is static and the layers [0, E) / [E, L) run in loops over exactly
  those layers, so no conditional is taken per layer (on a GPU a conditional's predicate is read on the host). Its
  greedy program has no conditional at all; the CPU program has a cond per layer (E is a runtime value there)."""
  count = lambda text: text.count('stablehlo.case') + text.count('stablehlo.if')
  shallow, deep = (create(CONFIG.replace(num_hidden_layers=n), seed=0) for n in (2, 6))
  stacked = [count(_lowered_decode_loop(m, unstack=False)) for m in (shallow, deep)]
  assert stacked == [0, 0], stacked
  unstacked = [count(_lowered_decode_loop(m, unstack=True)) for m in (shallow, deep)]
  assert unstacked[1] > unstacked[0], unstacked  # the CPU path: E traced, a cond per layer


def test_a_new_prompt_length_reuses_the_programs(model):
  """Prompts are padded to a multiple of PROMPT_BUCKET: lengths 5 and 40 share the prefill and decode programs;
  the padding changes no token."""
  from layerskip_jax.inference.generate import compiled_programs

  first = generate(model, [[3] * 5], strategy='self_speculative', exit_layer=2, num_speculations=2, max_new_tokens=8)
  before = compiled_programs()
  prompt = np.random.RandomState(11).randint(0, 128, 40).tolist()
  result = generate(
    model, [prompt[:40]], strategy='self_speculative', exit_layer=2, num_speculations=2, max_new_tokens=8
  )
  assert compiled_programs() == before and len(first.tokens[0]) == 8
  full = np.asarray(model(jnp.asarray([prompt[:40] + result.tokens[0][:-1]])))[0, 39:]
  assert result.tokens[0] == full.argmax(-1).tolist()  # the full model's greedy continuation
