"""Mesh construction, the logical-axis rules, and a sharded forward on 8 host devices equal to 1 device."""

import pathlib
import textwrap

import jax
import pytest
from conftest import run_on_host_devices
from jax.sharding import PartitionSpec as P
from ml_collections import config_dict

from layerskip_jax import sharding
from layerskip_jax.errors import UsageError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_logical_rules():
  assert sharding.logical_to_spec(('layers', 'embed', 'mlp')) == P(None, 'fsdp', 'tensor')
  assert sharding.logical_to_spec(('vocab', 'embed')) == P('tensor', 'fsdp')
  assert sharding.logical_to_spec(('act_batch', 'act_seq', 'act_embed')) == P(('data', 'fsdp'), None, None)
  # a mesh axis is used once per array: the second claim on it is dropped
  assert sharding.logical_to_spec(('mlp', 'vocab')) == P('tensor', None)
  with pytest.raises(KeyError, match='no rule'):
    sharding.logical_to_spec(('nonsense',))


def _mesh_config(**sizes):
  base = {'data': 1, 'fsdp': -1, 'tensor': 1, 'dcn_data': 1, 'dcn_fsdp': 1, 'dcn_tensor': 1}
  return config_dict.ConfigDict({**base, **sizes})


def test_make_mesh_single_device_and_errors():
  mesh = sharding.make_mesh(_mesh_config(), jax.devices()[:1])
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(UsageError, match='multiply to 2, but there are 1 devices'):
    sharding.make_mesh(_mesh_config(fsdp=1, tensor=2), jax.devices()[:1])


SHARDED_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from ml_collections import config_dict
    from layerskip_jax import sharding
    from layerskip_jax.model import ModelConfig, create, create_sharded
    assert jax.device_count() == 8
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    mesh_cfg = config_dict.ConfigDict(dict(data=1, fsdp=4, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    mesh = sharding.make_mesh(mesh_cfg)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (8, 16)), jnp.int32)

    reference = create(cfg, seed=0)  # unsharded, on device 0
    model = create_sharded(cfg, mesh, seed=0)
    q = model.layers.self_attn.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor'), q.sharding.spec
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (4, 16, 32)
    for a, b in zip(jax.tree.leaves(nnx.state(reference)), jax.tree.leaves(nnx.state(model))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)  # same init, sharded or not
    nnx.update(reference, jax.tree.map(np.asarray, nnx.state(model)))  # identical weights for the comparison
    ref_logits = np.asarray(reference(tokens))

    graphdef, state = nnx.split(model)
    state_shardings = sharding.param_shardings(state, mesh)
    batch = sharding.batch_sharding(mesh)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t), in_shardings=(state_shardings, batch),
                      out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH)))
    with jax.set_mesh(mesh):
      logits = forward(state, jax.device_put(tokens, batch))
    assert len(logits.addressable_shards) == 8
    diff = float(np.max(np.abs(np.asarray(logits) - ref_logits)))
    assert diff <= 1e-5, diff
    print('OK', diff)
''')


def test_sharded_forward_on_8_devices_equals_single_device():
  assert 'OK' in run_on_host_devices(SHARDED_SCRIPT)
