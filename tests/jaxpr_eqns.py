"""Walks a jaxpr's equations, those of nested jaxprs (jit, custom_vjp, shard_map) included: the
tests and the 8-device check scripts find the Pallas calls a traced function makes with it."""
from jax.extend.core import jaxprs_in_params


def eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from eqns(sub)
