"""Golden test: our model's logits at every exit equal transformers' LlamaForCausalLM on the same weights.

The weights are copied by hand here (transposes only: rotate_half RoPE needs no q/k permutation); the conversion
commands (layerskip_jax.convert) are tested on their own.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from layerskip_jax.model import ModelConfig, RopeScaling, create

torch = pytest.importorskip('torch', reason='torch is needed for the transformers golden test')
transformers = pytest.importorskip('transformers', reason='transformers is needed for the golden test')

CASES = {
    'mha': dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, tie_word_embeddings=False),
    'gqa_4to1_tied_odd_ffn': dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=99,
                                  tie_word_embeddings=True),
    'llama3_rope': dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, rope_theta=500000.0,
                        rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
}


def _copy_weights(hf_model, model, num_layers):
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}

  def stacked(name, transpose=True):
    w = np.stack([sd[f'model.layers.{i}.{name}.weight'] for i in range(num_layers)])
    return jnp.asarray(w.transpose(0, 2, 1) if transpose else w)

  model.embed_tokens[...] = jnp.asarray(sd['model.embed_tokens.weight'])
  model.norm.scale[...] = jnp.asarray(sd['model.norm.weight'])
  if 'lm_head' in vars(model):
    model.lm_head[...] = jnp.asarray(sd['lm_head.weight'].T)
  for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    getattr(model.layers.self_attn, name)[...] = stacked(f'self_attn.{name}')
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    getattr(model.layers.mlp, name)[...] = stacked(f'mlp.{name}')
  model.layers.input_layernorm.scale[...] = stacked('input_layernorm', transpose=False)
  model.layers.post_attention_layernorm.scale[...] = stacked('post_attention_layernorm', transpose=False)


@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_match_transformers_at_every_exit(case):
  kw = {**dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, rms_norm_eps=1e-6,
              max_position_embeddings=256, rope_theta=10000.0), **CASES[case]}
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, 'rope_scaling': (
      dict(kw['rope_scaling']) if 'rope_scaling' in kw else None)})).eval()
  ours = {k: v for k, v in kw.items() if k != 'rope_scaling'}
  model = create(ModelConfig(**ours, rope_scaling=RopeScaling(**kw.get('rope_scaling', {}))))
  _copy_weights(hf_model, model, kw['num_hidden_layers'])

  tokens = np.random.RandomState(0).randint(0, 300, (2, 100))  # past original_max_position_embeddings
  with torch.no_grad():
    out = hf_model(torch.tensor(tokens), output_hidden_states=True)
    exits = [hf_model.lm_head(hf_model.model.norm(out.hidden_states[e])).numpy() for e in range(1, 3)]
  reference = out.logits.numpy()
  scale = np.abs(reference).max()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), reference, atol=1e-4 * scale, rtol=0)
  for exit_layer, ref in enumerate(exits, start=1):  # hidden_states[E] is the output of the first E layers
    ours_e = np.asarray(model(jnp.asarray(tokens), exit_layer=exit_layer))
    np.testing.assert_allclose(ours_e, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
