"""Hugging Face <-> layerskip_jax conversion, proven against transformers' logits at every exit."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from layerskip_jax import api, checkpoint_dir
from layerskip_jax.convert import export_hf, import_hf
from layerskip_jax.data import tokenizer as tokenizer_lib
from layerskip_jax.errors import UsageError

torch = pytest.importorskip('torch', reason='torch is needed to build reference Hugging Face models')
transformers = pytest.importorskip('transformers', reason='transformers is needed for the reference logits')

ROOT = pathlib.Path(__file__).resolve().parent.parent
CASES = {
  'mha': dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=128),
  'gqa_4to1': dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=128),
  'tied': dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True),
  'llama3_rope_odd_ffn': dict(
    num_attention_heads=4,
    num_key_value_heads=1,
    intermediate_size=99,
    rope_theta=500000.0,
    rope_scaling=dict(
      rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
    ),
  ),
}
TOKENS = np.random.RandomState(0).randint(0, 512, (2, 80))  # longer than original_max_position_embeddings


def _hf_model(case: str, seed: int = 0):
  kw = {
    **dict(
      vocab_size=512,
      hidden_size=64,
      num_hidden_layers=3,
      rms_norm_eps=1e-6,
      max_position_embeddings=256,
      tie_word_embeddings=False,
    ),
    **CASES[case],
  }
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
  with torch.no_grad():  # larger weights than the default init: clearer logit margins
    for p in model.parameters():
      if p.dim() == 2:
        p.mul_(3.0)
  return model


def _reference_logits(hf_model):
  """transformers' logits at every exit: lm_head(norm(hidden_states[E])) for E < L, and the final logits."""
  with torch.no_grad():
    out = hf_model(torch.tensor(TOKENS), output_hidden_states=True)
    num_layers = hf_model.config.num_hidden_layers
    exits = [hf_model.lm_head(hf_model.model.norm(out.hidden_states[e])).numpy() for e in range(1, num_layers)]
  return exits + [out.logits.numpy()]


def _assert_matches(lm, references):
  for exit_layer, ref in enumerate(references, start=1):
    ours = lm.logits(TOKENS, exit_layer=exit_layer)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max(), err_msg=f'exit {exit_layer}')


@pytest.fixture(scope='module')
def corpus_text() -> str:
  stdlib = pathlib.Path(json.__file__).parent.parent
  return ''.join(p.read_text(errors='ignore') for p in sorted(stdlib.glob('[a-c]*.py'))[:12])


@pytest.fixture(scope='module')
def sentencepiece_file(tmp_path_factory, corpus_text) -> pathlib.Path:
  import sentencepiece as spm

  d = tmp_path_factory.mktemp('spm')
  (d / 'corpus.txt').write_text(corpus_text)
  spm.SentencePieceTrainer.train(
    input=str(d / 'corpus.txt'),
    model_prefix=str(d / 'tokenizer'),
    vocab_size=400,
    byte_fallback=True,
    model_type='bpe',
    character_coverage=0.98,
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    minloglevel=2,
  )
  return d / 'tokenizer.model'


@pytest.fixture(scope='module')
def hf_tokenizer_file(tmp_path_factory, corpus_text) -> pathlib.Path:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=['<|begin_of_text|>', '<|end_of_text|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator([corpus_text], trainer)
  path = tmp_path_factory.mktemp('hf_tok') / 'tokenizer.json'
  tok.save(str(path))
  return path


@pytest.mark.parametrize('case', sorted(CASES))
def test_import_matches_transformers_at_every_exit(case, tmp_path):
  hf_model = _hf_model(case)
  hf_model.save_pretrained(tmp_path / 'hf')
  import_hf(tmp_path / 'hf', tmp_path / 'ours')
  lm = api.load(tmp_path / 'ours')
  assert lm.model.config.num_key_value_heads == CASES[case]['num_key_value_heads']
  _assert_matches(lm, _reference_logits(hf_model))


def test_export_round_trips_and_loads_in_transformers(tmp_path, sentencepiece_file):
  hf_model = _hf_model('llama3_rope_odd_ffn', seed=1)
  hf_model.save_pretrained(tmp_path / 'hf', max_shard_size='100KB')  # a sharded index on the way in
  assert (tmp_path / 'hf' / 'model.safetensors.index.json').is_file()
  (tmp_path / 'hf' / 'tokenizer.model').write_bytes(sentencepiece_file.read_bytes())
  import_hf(tmp_path / 'hf', tmp_path / 'ours')
  export_hf(tmp_path / 'ours', tmp_path / 'exported', max_shard_size='200KB')  # and sharded on the way out
  assert (tmp_path / 'exported' / 'model.safetensors.index.json').is_file()
  assert (tmp_path / 'exported' / 'tokenizer.model').is_file()
  import_hf(tmp_path / 'exported', tmp_path / 'again')
  first, again = api.load(tmp_path / 'ours'), api.load(tmp_path / 'again')
  for a, b in zip(nnx.to_pure_dict(nnx.state(first.model)).values(), nnx.to_pure_dict(nnx.state(again.model)).values()):
    for x, y in zip(*(jax_leaves(t) for t in (a, b))):
      np.testing.assert_array_equal(x, y)  # bit-exact
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  expected, got = _reference_logits(hf_model), _reference_logits(reloaded)
  for e, g in zip(expected, got):
    np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max())
  # transformers serves it with its own self-speculative decoding (assistant_early_exit=E), matching plain greedy
  prompt = torch.tensor(TOKENS[:1, :10])
  with torch.no_grad():
    greedy = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    early_exit = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, assistant_early_exit=2)
  assert greedy.tolist() == early_exit.tolist()


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('kind', ['sentencepiece', 'tokenizer.json'])
def test_tokenizers_round_trip_through_import_and_export(kind, tmp_path, sentencepiece_file, hf_tokenizer_file):
  hf_model = _hf_model('mha')
  hf_model.save_pretrained(tmp_path / 'hf')
  source = sentencepiece_file if kind == 'sentencepiece' else hf_tokenizer_file
  (tmp_path / 'hf' / source.name).write_bytes(source.read_bytes())
  import_hf(tmp_path / 'hf', tmp_path / 'ours')
  lm = api.load(tmp_path / 'ours')
  text = 'def add(a, b):\n    return a + b  # ünïcode ok\n'
  ids = lm.tokenizer.encode(text)
  assert ids[0] == lm.tokenizer.bos_id and lm.tokenizer.decode(ids) == text
  assert lm.tokenizer.eos_ids
  export_hf(tmp_path / 'ours', tmp_path / 'exported')
  exported = tokenizer_lib.load(tmp_path / 'exported')
  assert exported.encode(text) == ids and exported.decode(ids) == text
  hf_config = json.loads((tmp_path / 'exported' / 'config.json').read_text())
  assert hf_config['bos_token_id'] == lm.tokenizer.bos_id


def test_bf16_checkpoints_import_in_bf16(tmp_path):
  hf_model = _hf_model('gqa_4to1').to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path / 'hf')
  import_hf(tmp_path / 'hf', tmp_path / 'ours')
  lm = api.load(tmp_path / 'ours')
  assert lm.config.model.param_dtype == 'bfloat16'
  q = lm.model.layers.self_attn.q_proj[...]
  ref = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(q[1], np.float32), ref)
  import_hf(tmp_path / 'hf', tmp_path / 'f32', param_dtype='float32')
  assert api.load(tmp_path / 'f32').model.layers.self_attn.q_proj[...].dtype == np.float32


def _write_hf(tmp_path, case='mha', **config_changes):
  hf_model = _hf_model(case)
  hf_model.save_pretrained(tmp_path / 'hf')
  if config_changes:
    path = tmp_path / 'hf' / 'config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
  return tmp_path / 'hf'


def _no_leftovers(directory: pathlib.Path):
  return [p.name for p in directory.iterdir() if p.name.startswith('.') and '.tmp-' in p.name]


@pytest.mark.parametrize(
  'changes,message',
  [
    ({'model_type': 'mistral', 'sliding_window': 4096}, 'unsupported architecture: sliding-window attention'),
    ({'model_type': 'mixtral', 'num_local_experts': 8}, 'unsupported architecture: mixture-of-experts'),
    ({'attention_bias': True}, 'unsupported architecture: bias terms'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}}, "rope scaling type 'yarn' is not supported"),
    ({'hidden_size': 96}, 'tensor model.embed_tokens.weight has shape (512, 64), but config.json implies (512, 96)'),
    ({'num_hidden_layers': 4}, 'tensor model.layers.3.input_layernorm.weight is missing'),
  ],
)
def test_import_rejects_bad_input_cleanly(tmp_path, changes, message):
  hf_dir = _write_hf(tmp_path, **changes)
  with pytest.raises(UsageError, match=message.replace('(', r'\(').replace(')', r'\)')):
    import_hf(hf_dir, tmp_path / 'out')
  assert not (tmp_path / 'out').exists() and not _no_leftovers(tmp_path)


def test_missing_config_and_existing_output(tmp_path):
  with pytest.raises(UsageError, match='no config.json'):
    import_hf(tmp_path, tmp_path / 'out')
  hf_dir = _write_hf(tmp_path)
  import_hf(hf_dir, tmp_path / 'out')
  with pytest.raises(UsageError, match='already exists; pass --overwrite'):
    import_hf(hf_dir, tmp_path / 'out')
  import_hf(hf_dir, tmp_path / 'out', overwrite=True)
  assert checkpoint_dir.resolve(tmp_path / 'out').step == 0


def test_checkpoint_whose_config_does_not_match_its_tensors(tmp_path):
  import_hf(_write_hf(tmp_path), tmp_path / 'ours')
  path = tmp_path / 'ours' / 'layerskip_config.json'
  data = json.loads(path.read_text())
  data['model']['intermediate_size'] = 100
  path.write_text(json.dumps(data))
  with pytest.raises(
    UsageError,
    match=r'parameter layers/mlp/down_proj has shape \(3, 128, 64\), but '
    r'layerskip_config.json implies \(3, 100, 64\)',
  ):
    export_hf(tmp_path / 'ours', tmp_path / 'exported')
  assert not (tmp_path / 'exported').exists() and not _no_leftovers(tmp_path)


def test_command_line(tmp_path):
  hf_dir = _write_hf(tmp_path, 'tied')
  run = lambda *a: subprocess.run(
    [sys.executable, '-m', 'layerskip_jax.convert', *a], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  ok = run('import_hf', '--hf_dir', str(hf_dir), '--out', str(tmp_path / 'ours'))
  assert ok.returncode == 0, ok.stderr
  again = run('import_hf', '--hf_dir', str(hf_dir), '--out', str(tmp_path / 'ours'))
  assert again.returncode == 2 and again.stderr.strip() == (
    f'error: --out={tmp_path / "ours"}: already exists; pass --overwrite to replace it'
  )
  bad = run('import_hf', '--hf_dir', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'x'))
  assert bad.returncode == 2 and 'no config.json' in bad.stderr and 'Traceback' not in bad.stderr
  usage = run('convert_everything', '--out', 'x')
  assert usage.returncode == 2 and 'expected one command, import_hf or export_hf' in usage.stderr
  exported = run('export_hf', '--ckpt', str(tmp_path / 'ours'), '--out', str(tmp_path / 'hf_out'))
  assert exported.returncode == 0, exported.stderr
  assert not (tmp_path / 'hf_out' / 'model.safetensors.index.json').exists()
  config = json.loads((tmp_path / 'hf_out' / 'config.json').read_text())
  assert config['tie_word_embeddings'] is True and config['architectures'] == ['LlamaForCausalLM']
