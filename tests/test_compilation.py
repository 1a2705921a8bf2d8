"""jaxreg.jit: jax.jit plus the XLA:CPU options, top level only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import compilation
from jaxreg import warping
import jaxreg


def _ssd_grad(moving, disp, fixed):
    loss = lambda u: jnp.sum((warping.warp(moving, u) - fixed) ** 2)
    return jax.value_and_grad(loss)(disp)


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    moving = jnp.asarray(rng.standard_normal((12, 10, 8, 3)), jnp.float32)
    fixed = jnp.asarray(rng.standard_normal((12, 10, 8, 3)), jnp.float32)
    disp = jnp.asarray(rng.uniform(-2, 2, (12, 10, 8, 3)), jnp.float32)
    return moving, disp, fixed


def test_same_result_as_jax_jit():
    args = _pair()
    value, grad = compilation.jit(_ssd_grad)(*args)
    ref_value, ref_grad = jax.jit(_ssd_grad)(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_options_reach_the_cpu_compiler():
    # The warp's gradient is where YNNPACK fusion hurts: the compiled program must not
    # contain one (the option does nothing on other backends, where jit is plain).
    if jax.default_backend() != "cpu":
        pytest.skip("the option is XLA:CPU's")
    text = compilation.jit(_ssd_grad).lower(*_pair()).compile().as_text()
    assert "__ynn_fusion" not in text


def test_nested_in_another_jit_vmap_and_grad():
    inner = compilation.jit(lambda x, s: jnp.sum(jnp.sin(x) * s), static_argnames=())
    x = jnp.linspace(0.0, 1.0, 8)
    expected = float(jnp.sum(jnp.sin(x) * 2.0))
    assert np.isclose(jax.jit(inner)(x, 2.0), expected)  # jax: no options on nested jits
    assert np.isclose(compilation.jit(inner)(x, 2.0), expected)
    np.testing.assert_allclose(jax.vmap(inner, in_axes=(0, None))(x[None], 2.0), [expected],
                               rtol=1e-6)
    np.testing.assert_allclose(jax.grad(inner)(x, 2.0), 2.0 * jnp.cos(x), rtol=1e-6)


def test_decorator_forms_and_static_args():
    @compilation.jit(static_argnames=("n",))
    def power(x, n):
        return x ** n

    assert float(power(3.0, n=2)) == 9.0
    assert float(power(3.0, n=3)) == 27.0
    assert power._cache_size() == 2  # jit attributes reach the top-level jit
    assert power.__name__ == "power"
    assert jaxreg.jit is compilation.jit
    assert float(compilation.jit(functools.partial(power, n=2))(4.0)) == 16.0
