"""DiG with the jnp reference GLA, conv and SwiGLU backward against DiG with Pallas kernels
(interpret mode): same parameters, same output and parameter gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax.models import create_model


def _model(backend, conv_backend="reference", elementwise_backend="reference"):
  return create_model("DiG-S/2", input_size=8, in_channels=4, num_classes=10, rngs=nnx.Rngs(0),
                      depth=2, gla_backend=backend, conv_backend=conv_backend,
                      elementwise_backend=elementwise_backend, pallas_interpret=backend != "reference")


def _out_and_grads(backend, conv_backend="reference", elementwise_backend="reference"):
  """The model's output and parameter gradients of a squared error, on fixed random inputs."""
  ks = jax.random.split(jax.random.PRNGKey(0), 2)
  x = jax.random.normal(ks[0], (2, 8, 8, 4))
  t = jnp.array([3, 700])
  y = jnp.array([1, 7])
  target = jax.random.normal(ks[1], (2, 8, 8, 8))
  # adaLN-Zero starts at zero, so perturb every parameter to make the GLA path count.
  graphdef, params = nnx.split(_model(backend, conv_backend, elementwise_backend), nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(kk, p.shape)
                                     for p, kk in zip(leaves, keys)])

  def loss(params):
    out = nnx.merge(graphdef, params)(x, t, y)
    return jnp.mean((out - target) ** 2), out

  # jit: interpret-mode kernels run as one compiled program, not op by op
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, jax.tree.leaves(grads)


_reference_out_and_grads = functools.lru_cache(maxsize=None)(
    lambda: _out_and_grads("reference"))  # computed once per test process


@pytest.mark.parametrize("backend,conv_backend,elementwise_backend", [
    ("pallas_gpu", "reference", "reference"), ("pallas_tpu", "reference", "reference"),
    ("pallas_gpu", "pallas_gpu", "pallas_gpu")])
def test_dig_matches_reference_backend(backend, conv_backend, elementwise_backend):
  want_out, want_grads = _reference_out_and_grads()
  got_out, got_grads = _out_and_grads(backend, conv_backend, elementwise_backend)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-4, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-5)


def test_transposed_layer_reads_the_columns_in_place():
  """A DiG block that scans the grid by columns, on a 16 x 16 grid (whole chunks per column):
  with the GPU kernels (interpret mode) the GLA layer reads the raster tokens in column order
  in place, with no transposed copy; output and gradients match the reference backends, which
  transpose the block's input and output instead. Layer 3 scans the columns backwards
  (test_gla_layer.py covers both directions of the layer itself)."""
  from dig_jax.models.dig import DiGBlock
  layer_index = 3

  def block(backend):
    return DiGBlock(64, 2, 128, layer_index=layer_index, gla_backend=backend,
                    conv_backend="reference", elementwise_backend=backend,
                    pallas_interpret=backend != "reference", rngs=nnx.Rngs(0))
  ks = jax.random.split(jax.random.PRNGKey(layer_index), 3)
  x = jax.random.normal(ks[0], (1, 16, 16, 64))
  c = jax.random.normal(ks[1], (1, 64))
  dout = jax.random.normal(ks[2], (1, 16, 16, 64))

  def value_and_grads(model):
    graphdef, params = nnx.split(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)  # adaLN-Zero starts at zero: perturb everything
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(kk, p.shape)
                                       for p, kk in zip(leaves, keys)])
    fn = lambda params, x: nnx.merge(graphdef, params)(x, c)

    def out_and_grads(params, x):
      out, vjp = jax.vjp(fn, params, x)
      return out, vjp(dout)
    out, grads = jax.jit(out_and_grads)(params, x)  # jit: interpret-mode kernels run fast
    return out, jax.tree.leaves(grads), jax.make_jaxpr(out_and_grads)(params, x)

  with jax.default_matmul_precision("highest"):
    want_out, want_grads, _ = value_and_grads(block("reference"))
    got_out, got_grads, jaxpr = value_and_grads(block("pallas_gpu"))
  np.testing.assert_allclose(got_out, want_out, rtol=1e-4, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5)
  fwd = jax.make_jaxpr(lambda x: block("pallas_gpu")(x, c))(x)
  for eqns in (fwd.jaxpr.eqns, jaxpr.jaxpr.eqns):  # no transposed copy of the activations
    assert not [e for e in eqns if e.primitive.name == "transpose"
                and e.invars[0].aval.ndim >= 3 and e.invars[0].aval.size >= x.size]
