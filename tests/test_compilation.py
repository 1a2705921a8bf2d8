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


# the cache of exported programs ----------------------------------------------------------

TRACES = []


def _scaled_sum(x, mask=None, *, scale):
    TRACES.append(x.shape)  # runs only while jax traces the function
    y = x * scale
    return jnp.sum(y if mask is None else y * mask, axis=0)


@pytest.fixture
def export_dir(tmp_path, monkeypatch):
    folder = tmp_path / "exported"
    monkeypatch.setattr(compilation, "_EXPORT_DIR", str(folder))
    TRACES.clear()
    return folder


def test_exported_program_is_reused_without_tracing(export_dir):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    f = compilation.jit(_scaled_sum, static_argnames=("scale",), export=True)
    np.testing.assert_array_equal(f(x, scale=2.0), x.sum(0) * 2)
    assert len(list(export_dir.iterdir())) == 1 and TRACES == [(4, 3)]
    # a new process is a new jitted function with the same cache folder: no tracing
    g = compilation.jit(_scaled_sum, static_argnames=("scale",), export=True)
    np.testing.assert_array_equal(g(jnp.asarray(x), scale=2.0), x.sum(0) * 2)
    assert TRACES == [(4, 3)]
    # another static value, shape or None-ness is another program
    g(x, scale=3.0)
    g(x[:2], scale=3.0)
    g(x, np.ones_like(x), scale=3.0)
    assert len(list(export_dir.iterdir())) == 4 and len(TRACES) == 4


def test_without_the_cache_nothing_is_exported(tmp_path, monkeypatch):
    monkeypatch.setattr(compilation, "_EXPORT_DIR", None)
    f = compilation.jit(_scaled_sum, static_argnames=("scale",), export=True)
    np.testing.assert_array_equal(f(np.ones((2, 2), np.float32), scale=1.0), [2.0, 2.0])
    assert not any(tmp_path.iterdir())


def test_a_damaged_cache_file_falls_back_to_the_plain_jit(export_dir, caplog):
    x = np.ones((3, 2), np.float32)
    compilation.jit(_scaled_sum, static_argnames=("scale",), export=True)(x, scale=1.0)
    (path,) = export_dir.iterdir()
    path.write_bytes(b"not a program")
    f = compilation.jit(_scaled_sum, static_argnames=("scale",), export=True)
    np.testing.assert_array_equal(f(x, scale=1.0), [3.0, 3.0])
    assert "runs without its exported-program cache" in caplog.text


def test_the_key_follows_the_source_and_the_extra_parts(export_dir, monkeypatch):
    x = np.ones((3, 2), np.float32)
    extra = [1]
    f = compilation.jit(_scaled_sum, static_argnames=("scale",), export=lambda: tuple(extra))
    f(x, scale=1.0)
    extra[0] = 2
    f(x, scale=1.0)
    monkeypatch.setattr(compilation, "_source_hash", lambda: "edited")
    f(x, scale=1.0)
    assert len(list(export_dir.iterdir())) == 3


def test_convex_adam_is_bitwise_the_same_through_the_cache(export_dir):
    from jaxreg.kernels import cpu
    from jaxreg.solver import ConvexAdamConfig, convex_adam

    rng = np.random.default_rng(0)
    fixed = rng.standard_normal((16, 14, 12, 4)).astype(np.float32)
    moving = np.roll(fixed, 1, axis=0)
    config = ConvexAdamConfig(grid_sp=4, disp_hw=2, iterations=5)
    compilation._EXPORT_DIR = None
    plain = np.asarray(convex_adam(fixed, moving, config=config))
    compilation._EXPORT_DIR = str(export_dir)
    first = np.asarray(convex_adam(fixed, moving, config=config))  # exported here
    again = np.asarray(compilation.jit(
        convex_adam.__wrapped__, static_argnames=("config",),
        export=lambda: (cpu.usable(),))(
            fixed, moving, config=config))  # read back, as a new process would
    assert len(list(export_dir.iterdir())) == 1
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(again, plain)


def test_use_caches_sets_both_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs,
              compilation._EXPORT_DIR)
    try:
        assert compilation.use_caches(str(tmp_path)) == str(tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        assert compilation.export_dir() == str(tmp_path / "exported")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # every program
        assert compilation.use_caches("") is None and compilation.export_dir() is None
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        assert compilation.use_caches(str(tmp_path)) == str(tmp_path / "env")  # wins
        assert compilation.export_dir() == str(tmp_path / "env" / "exported")
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation._EXPORT_DIR = before[2]
