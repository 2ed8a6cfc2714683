"""Walking jaxprs in tests: what a traced function computes, nested calls included."""


def equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations (scan, pjit, remat,
  custom_vjp)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from equations(inner)
