"""dig_jax.diffusion against independent float64 numpy computations.

The references below are written from the math (Bayes' rule for the posterior, the closed-form
Gaussian KL, the erf normal CDF, DDPM/DDIM update equations), not from the code under test.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax import diffusion as D

RNG = np.random.default_rng(0)
N, H, W, C = 4, 4, 4, 4
SHAPE = (N, H, W, C)


# ----------------------------------------------------------------------------- numpy references
def np_coeffs(betas):
  """Schedule quantities from first principles (posterior by conditioning two Gaussians)."""
  betas = np.asarray(betas, np.float64)
  n = betas.size
  ab = np.array([np.prod(1.0 - betas[:i + 1]) for i in range(n)])
  ab_prev = np.concatenate([[1.0], ab[:-1]])
  alpha = 1.0 - betas
  # q(x_{t-1} | x_0) = N(sqrt(ab_prev) x_0, 1 - ab_prev) and
  # q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta) => precision 1/(1 - ab_prev) + alpha/beta.
  # At t = 0, x_{t-1} is x_0 itself: mean x_0, variance 0.
  post_var, coef1, coef2 = np.zeros(n), np.ones(n), np.zeros(n)
  for t in range(1, n):
    post_var[t] = 1.0 / (1.0 / (1.0 - ab_prev[t]) + alpha[t] / betas[t])
    coef1[t] = post_var[t] * np.sqrt(ab_prev[t]) / (1.0 - ab_prev[t])
    coef2[t] = post_var[t] * np.sqrt(alpha[t]) / betas[t]
  log_clip = np.log(np.where(np.arange(n) == 0, post_var[1], np.maximum(post_var, 1e-300)))
  return dict(betas=betas, ab=ab, ab_prev=ab_prev, post_var=post_var, coef1=coef1, coef2=coef2,
              log_clip=log_clip)


def col(a, t):
  return np.asarray(a)[t][:, None, None, None]


def np_p_mean_var(c, out, xt, t, learn_sigma=True, clip=False):
  eps = out[..., :C]
  ab = col(c["ab"], t)
  x0 = (xt - np.sqrt(1.0 - ab) * eps) / np.sqrt(ab)
  if clip:
    x0 = np.clip(x0, -1.0, 1.0)
  mean = col(c["coef1"], t) * x0 + col(c["coef2"], t) * xt
  if learn_sigma:
    frac = (out[..., C:] + 1.0) / 2.0
    log_var = frac * np.log(col(c["betas"], t)) + (1.0 - frac) * col(c["log_clip"], t)
  else:
    log_var = np.broadcast_to(np.log(np.where(col(np.arange(len(c["betas"])), t) == 0,
                                              c["post_var"][1], col(c["betas"], t))), xt.shape)
  return mean, log_var, x0


def np_kl(m1, lv1, m2, lv2):
  s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
  return np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2.0 * s2 ** 2) - 0.5


erf = np.vectorize(math.erf)


def cdf_erf(z):
  return 0.5 * (1.0 + erf(z / math.sqrt(2.0)))


def cdf_tanh(z):  # ADM's approximation, the one the code is meant to reproduce
  return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


def np_bin_prob(x, mean, log_scale, cdf):
  """P(bin of x) for 8-bit data in [-1, 1]; the end bins are open."""
  s = np.exp(log_scale)
  upper = cdf((x + 1.0 / 255.0 - mean) / s)
  lower = cdf((x - 1.0 / 255.0 - mean) / s)
  return np.where(x < -0.999, upper, np.where(x > 0.999, 1.0 - lower, upper - lower))


def pixels(shape):
  """Random 8-bit values mapped to [-1, 1], both extremes included."""
  k = RNG.integers(0, 256, size=shape)
  k.flat[0], k.flat[1] = 0, 255
  return (k / 127.5 - 1.0).astype(np.float32)


def respaced(steps):
  """The schedule under test and its float64 reference (kept steps of the 1000-step process)."""
  s = D.create_schedule(1000, steps)
  tmap = np.asarray(s.timestep_map)
  ab = np.cumprod(1.0 - D.linear_betas())[tmap]
  return s, np_coeffs(1.0 - ab / np.concatenate([[1.0], ab[:-1]])), tmap


# A random linear "network" in NHWC that also depends on the timestep it is fed.
W_EPS = RNG.normal(size=(C, C)) * 0.5
W_V = RNG.normal(size=(C, C)) * 0.5


def np_model(x, t_model, w_eps=W_EPS, w_v=W_V):
  tt = np.asarray(t_model, np.float64)[:, None, None, None]
  eps = x @ w_eps + 0.3 * np.sin(0.01 * tt + np.arange(C))
  v = np.tanh(x @ w_v + np.cos(0.003 * tt))
  return np.concatenate([eps, v], axis=-1)


def jax_model(x, t_model, w_eps=jnp.asarray(W_EPS, jnp.float32), w_v=jnp.asarray(W_V, jnp.float32)):
  tt = t_model.astype(jnp.float32)[:, None, None, None]
  eps = x @ w_eps + 0.3 * jnp.sin(0.01 * tt + jnp.arange(C))
  v = jnp.tanh(x @ w_v + jnp.cos(0.003 * tt))
  return jnp.concatenate([eps, v], axis=-1)


def f64(x):
  return np.asarray(x, np.float64)


def close(got, want, **tol):
  """assert_allclose that refuses NaN/inf (numpy's default treats NaN == NaN as equal)."""
  got, want = f64(got), f64(want)
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(want))
  np.testing.assert_allclose(got, want, equal_nan=False, **tol)


# ----------------------------------------------------------------------------- schedule
def test_linear_betas():
  b = D.linear_betas(1000)
  assert b.dtype == np.float64 and b.shape == (1000,)
  close(b[[0, -1]], [1e-4, 0.02], rtol=1e-12)
  close(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)
  # Fewer steps scale the range so the total noise stays comparable.
  close(D.linear_betas(250)[[0, -1]], [4e-4, 0.08], rtol=1e-12)


def test_schedule_coefficients():
  betas = D.linear_betas(1000)
  s, c = D.make_schedule(betas), np_coeffs(betas)
  assert s.num_timesteps == 1000
  np.testing.assert_array_equal(s.timestep_map, np.arange(1000))
  expect = dict(
      betas=c["betas"], alphas_cumprod=c["ab"], alphas_cumprod_prev=c["ab_prev"],
      sqrt_alphas_cumprod=np.sqrt(c["ab"]), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - c["ab"]),
      sqrt_recip_alphas_cumprod=1 / np.sqrt(c["ab"]),
      sqrt_recipm1_alphas_cumprod=np.sqrt((1 - c["ab"]) / c["ab"]),
      posterior_variance=c["post_var"], posterior_log_variance_clipped=c["log_clip"],
      posterior_mean_coef1=c["coef1"], posterior_mean_coef2=c["coef2"])
  for name, want in expect.items():
    got = getattr(s, name)
    assert got.dtype == jnp.float32, name
    close(f64(got), want, rtol=2e-6, atol=1e-12, err_msg=name)
  # The well-known end of the linear schedule: alpha_bar_999 ~ 4.036e-5.
  close(float(s.alphas_cumprod[-1]), 4.0358e-5, rtol=1e-3)


def test_schedule_is_a_pytree():
  s = D.create_schedule(1000, 10)
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert len(leaves) == 12
  doubled = jax.jit(lambda s: jax.tree_util.tree_map(lambda a: a * 2, s))(s)
  assert doubled.num_timesteps == 10
  np.testing.assert_array_equal(doubled.timestep_map, 2 * np.asarray(s.timestep_map))


# ----------------------------------------------------------------------------- forward / posterior
def test_q_sample():
  s, c = D.create_schedule(), np_coeffs(D.linear_betas())
  x0, noise = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
  t = np.array([0, 17, 500, 999])
  got = D.q_sample(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
  want = np.sqrt(col(c["ab"], t)) * x0 + np.sqrt(1 - col(c["ab"], t)) * noise
  close(f64(got), want, rtol=1e-5, atol=1e-6)


def test_q_posterior_mean_variance():
  s, c = D.create_schedule(), np_coeffs(D.linear_betas())
  x0, xt = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
  t = np.array([0, 1, 420, 999])
  mean, var, log_var = D.q_posterior_mean_variance(
      s, jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t))
  close(f64(mean), col(c["coef1"], t) * x0 + col(c["coef2"], t) * xt,
        rtol=1e-5, atol=1e-6)
  close(f64(mean)[0], x0[0], rtol=1e-5, atol=1e-6)  # t = 0: mean is x_0
  close(f64(var).reshape(-1), c["post_var"][t], rtol=1e-5, atol=1e-12)
  close(f64(log_var).reshape(-1), c["log_clip"][t], rtol=1e-6)


@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance_learned_range(clip):
  s, c = D.create_schedule(), np_coeffs(D.linear_betas())
  xt = RNG.normal(size=SHAPE) * 1.5
  out = np.concatenate([RNG.normal(size=SHAPE), np.tanh(RNG.normal(size=SHAPE))], axis=-1)
  t = np.array([0, 3, 600, 999])
  got = D.p_mean_variance(s, jnp.asarray(out, jnp.float32), jnp.asarray(xt, jnp.float32),
                          jnp.asarray(t), learn_sigma=True, clip_denoised=clip)
  mean, log_var, x0 = np_p_mean_var(c, out, xt, t, clip=clip)
  close(f64(got["pred_xstart"]), x0, rtol=1e-4, atol=1e-4)
  close(f64(got["mean"]), mean, rtol=1e-4, atol=1e-5)
  close(f64(got["log_variance"]), log_var, rtol=1e-5)
  close(f64(got["variance"]), np.exp(log_var), rtol=1e-5)


def test_p_mean_variance_fixed_large():
  s, c = D.create_schedule(), np_coeffs(D.linear_betas())
  xt, eps = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
  t = np.array([0, 1, 250, 999])
  got = D.p_mean_variance(s, jnp.asarray(eps, jnp.float32), jnp.asarray(xt, jnp.float32),
                          jnp.asarray(t), learn_sigma=False)
  mean, log_var, _ = np_p_mean_var(c, eps, xt, t, learn_sigma=False)
  close(f64(got["mean"]), mean, rtol=1e-4, atol=1e-5)
  close(f64(got["log_variance"]), log_var, rtol=1e-5)
  assert got["variance"].shape == SHAPE


def test_p_mean_variance_rejects_wrong_channels():
  s = D.create_schedule()
  with pytest.raises(ValueError, match="output channels"):
    D.p_mean_variance(s, jnp.ones(SHAPE), jnp.ones(SHAPE), jnp.zeros(N, jnp.int32))


# ----------------------------------------------------------------------------- likelihood terms
def test_normal_kl():
  m1, m2 = RNG.normal(size=50), RNG.normal(size=50)
  lv1, lv2 = RNG.uniform(-9, 1, size=50), RNG.uniform(-9, 1, size=50)
  got = D.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
  close(f64(got), np_kl(m1, lv1, m2, lv2), rtol=1e-4, atol=1e-5)
  assert np.all(f64(got) >= -1e-6)


def test_discretized_gaussian_log_likelihood():
  x = pixels((400,))
  log_scale = RNG.uniform(np.log(0.004), np.log(0.05), size=400)
  mean = x + RNG.normal(size=400) * np.exp(log_scale)  # within a few std of the data
  got = f64(D.discretized_gaussian_log_likelihood(
      jnp.asarray(x), jnp.asarray(mean, jnp.float32), jnp.asarray(log_scale, jnp.float32)))
  # The exact normal CDF: ADM's tanh approximation is within 2e-4 of it in probability.
  close(np.exp(got), np_bin_prob(x, mean, log_scale, cdf_erf), atol=4e-4)
  # ADM's approximate CDF, the same function as the reference implementation.
  want = np.log(np.maximum(np_bin_prob(x, mean, log_scale, cdf_tanh), 1e-12))
  close(got, want, rtol=1e-4, atol=1e-4)


def test_discretized_likelihood_is_a_distribution():
  """The 256 bins tile the real line, so their probabilities sum to one."""
  x = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
  for mean, log_scale in [(0.3, np.log(0.2)), (-0.95, np.log(0.03)), (0.0, np.log(0.9))]:
    lp = D.discretized_gaussian_log_likelihood(
        x, jnp.full_like(x, mean), jnp.full_like(x, log_scale))
    close(float(jnp.exp(lp).sum()), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- training loss
def np_training_losses(c, tmap, x0, t, noise):
  ab = col(c["ab"], t)
  xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  out = np_model(xt, tmap[t])
  mse = ((noise - out[..., :C]) ** 2).mean(axis=(1, 2, 3))
  true_mean = col(c["coef1"], t) * x0 + col(c["coef2"], t) * xt
  mean, log_var, _ = np_p_mean_var(c, out, xt, t)
  kl = np_kl(true_mean, col(c["log_clip"], t), mean, log_var).mean(axis=(1, 2, 3))
  nll = -np.log(np.maximum(np_bin_prob(x0, mean, 0.5 * log_var, cdf_tanh), 1e-12))
  vb = np.where(t == 0, nll.mean(axis=(1, 2, 3)), kl) / np.log(2.0)
  return mse, vb


@pytest.mark.parametrize("steps", [None, 10])
def test_training_losses(steps):
  """Unrespaced and respaced (the network must receive timestep_map[t]); t = 0 hits the decoder."""
  s, c, tmap = respaced(steps)
  x0, noise = pixels(SHAPE), RNG.normal(size=SHAPE).astype(np.float32)
  t = np.array([0, 1, s.num_timesteps // 2, s.num_timesteps - 1])
  got = jax.jit(lambda x0, t, z: D.training_losses(s, jax_model, x0, t, z))(
      jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  mse, vb = np_training_losses(c, tmap, f64(x0), t, f64(noise))
  close(f64(got["mse"]), mse, rtol=1e-4)
  close(f64(got["vb"]), vb, rtol=2e-3)
  close(f64(got["loss"]), mse + vb, rtol=2e-3)
  assert got["loss"].shape == (N,)


def test_training_losses_without_learned_sigma():
  s, c = D.create_schedule(), np_coeffs(D.linear_betas())
  x0, noise = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
  t = np.array([0, 9, 99, 999])
  eps_only = lambda x, tm: jax_model(x, tm)[..., :C]
  got = D.training_losses(s, eps_only, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                          jnp.asarray(noise, jnp.float32), learn_sigma=False)
  xt = np.sqrt(col(c["ab"], t)) * x0 + np.sqrt(1 - col(c["ab"], t)) * noise
  mse = ((noise - np_model(xt, t)[..., :C]) ** 2).mean(axis=(1, 2, 3))
  close(f64(got["loss"]), mse, rtol=1e-4)
  np.testing.assert_array_equal(f64(got["vb"]), 0.0)


def test_vb_trains_only_the_variance():
  """Gradients: vb reaches only the variance weights, mse only the eps weights; all finite."""
  s = D.create_schedule()
  x0, noise = jnp.asarray(pixels(SHAPE)), jnp.asarray(RNG.normal(size=SHAPE), jnp.float32)
  t = jnp.array([0, 5, 300, 999])
  params = dict(w_eps=jnp.asarray(W_EPS, jnp.float32), w_v=jnp.asarray(W_V, jnp.float32))

  def term(params, name):
    fn = lambda x, tm: jax_model(x, tm, params["w_eps"], params["w_v"])
    return D.training_losses(s, fn, x0, t, noise)[name].mean()

  g_vb, g_mse, g_loss = (jax.jit(jax.grad(term), static_argnums=1)(params, k)
                         for k in ("vb", "mse", "loss"))
  np.testing.assert_array_equal(g_vb["w_eps"], 0.0)
  np.testing.assert_array_equal(g_mse["w_v"], 0.0)
  assert np.abs(g_vb["w_v"]).max() > 1e-6 and np.abs(g_mse["w_eps"]).max() > 1e-6
  for g in jax.tree_util.tree_leaves(g_loss):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


# ----------------------------------------------------------------------------- respacing
def np_section_steps(num_timesteps, counts):
  """ADM's rule: positions accumulated in float64 one stride at a time, rounded half to even."""
  base, extra = divmod(num_timesteps, len(counts))
  steps, start = [], 0
  for i, count in enumerate(counts):
    size = base + (i < extra)
    stride = 1.0 if count == 1 else (size - 1) / (count - 1)
    pos = np.add.accumulate(np.concatenate([[0.0], np.full(count - 1, stride)]))
    steps += list(start + np.round(pos).astype(int))
    start += size
  return set(steps)


def test_space_timesteps():
  assert D.space_timesteps(1000, "10") == set(range(0, 1000, 111))
  assert D.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
  assert D.space_timesteps(1000, "ddim1000") == set(range(1000))
  steps250 = D.space_timesteps(1000, "250")
  assert steps250 == D.space_timesteps(1000, 250) == np_section_steps(1000, [250])
  assert len(steps250) == 250 and min(steps250) == 0 and max(steps250) == 999
  assert set(np.diff(sorted(steps250))) == {4, 5}
  for n, counts in [(300, [10, 15, 20]), (100, [7, 13]), (1000, [25]), (1001, [3, 5, 2])]:
    got = D.space_timesteps(n, ",".join(map(str, counts)))
    assert got == np_section_steps(n, counts) == D.space_timesteps(n, counts)
    assert len(got) == sum(counts)
  # A tie the float accumulation resolves downwards (49.4999... -> 49), as ADM's loop does.
  assert 149 in D.space_timesteps(300, "10,15,20") and 150 not in D.space_timesteps(300, "10,15,20")
  with pytest.raises(ValueError):
    D.space_timesteps(100, "ddim33")
  with pytest.raises(ValueError):
    D.space_timesteps(100, "30,30,60")


def test_respaced_schedule():
  betas = D.linear_betas(1000)
  ab = np.cumprod(1.0 - betas)
  kept = D.space_timesteps(1000, "25")
  s = D.respaced_schedule(betas, kept)
  order = np.array(sorted(kept))
  assert s.num_timesteps == 25 and s.timestep_map.dtype == jnp.int32
  np.testing.assert_array_equal(s.timestep_map, order)
  # Jumping between kept steps reproduces the original noise levels exactly.
  close(f64(s.alphas_cumprod), ab[order], rtol=2e-6)
  close(np.cumprod(1.0 - f64(s.betas)), ab[order], rtol=1e-5)
  assert float(s.betas[0]) == pytest.approx(betas[0], rel=1e-6)
  cs = D.create_schedule(1000, "ddim50")
  np.testing.assert_array_equal(cs.timestep_map, np.arange(0, 1000, 20))
  close(f64(cs.alphas_cumprod), ab[::20], rtol=2e-6)


# ----------------------------------------------------------------------------- samplers
def step_noise(key, t, shape=SHAPE):
  """The documented noise rule of the samplers: normal(fold_in(split(key)[1], t))."""
  return f64(jax.random.normal(jax.random.fold_in(jax.random.split(key)[1], t), shape))


def np_ddpm_step(c, tmap, x, t, z, clip=False):
  tt = np.full(N, t)
  mean, log_var, _ = np_p_mean_var(c, np_model(x, tmap[tt]), x, tt, clip=clip)
  return mean + (t > 0) * np.exp(0.5 * log_var) * z


def np_ddim_step(c, tmap, x, t, z, eta, clip=False):
  tt = np.full(N, t)
  _, _, x0 = np_p_mean_var(c, np_model(x, tmap[tt]), x, tt, clip=clip)
  ab, ab_prev = c["ab"][t], c["ab_prev"][t]
  eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
  sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
  return np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps + (t > 0) * sigma * z


@pytest.mark.parametrize("t", [0, 3, 9])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step(t, clip):
  s, c, tmap = respaced(10)
  x, z = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
  got = D.ddpm_step(jax_model, s, jnp.asarray(x, jnp.float32), t, jnp.asarray(z, jnp.float32),
                    clip_denoised=clip)
  close(f64(got), np_ddpm_step(c, tmap, x, t, z, clip), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [0, 4, 9])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step(t, eta):
  s, c, tmap = respaced(10)
  x, z = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
  got = D.ddim_step(jax_model, s, jnp.asarray(x, jnp.float32), t, jnp.asarray(z, jnp.float32),
                    eta=eta, clip_denoised=True)
  close(f64(got), np_ddim_step(c, tmap, x, t, z, eta, clip=True),
        rtol=1e-4, atol=1e-4)


def counting(fn):
  """Wraps a model_fn and counts how often it is traced."""
  traces = []

  def wrapped(x, t):
    traces.append(1)
    return fn(x, t)

  return wrapped, traces


def test_ddpm_sample_loop():
  s, c, tmap = respaced(5)
  key = jax.random.key(3)
  # The documented start noise when none is given: normal(split(key)[0]).
  x_T = f64(jax.random.normal(jax.random.split(key)[0], SHAPE))
  x = x_T
  for t in reversed(range(5)):
    x = np_ddpm_step(c, tmap, x, t, step_noise(key, t))

  model_fn, traces = counting(jax_model)
  seen = []
  sample = jax.jit(lambda k, z: D.ddpm_sample(model_fn, s, SHAPE, k, noise=z,
                                              progress=lambda i, n: seen.append((int(i), int(n)))))
  close(sample(key, jnp.asarray(x_T, jnp.float32)), x, rtol=1e-4, atol=1e-4)
  jax.effects_barrier()
  assert len(traces) == 1  # one traced step, run in a loop
  assert sorted(seen) == [(i, 5) for i in range(5)]
  close(jax.jit(lambda k: D.ddpm_sample(jax_model, s, SHAPE, k))(key), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_loop(eta):
  s, c, tmap = respaced(5)
  key, x_T = jax.random.key(4), RNG.normal(size=SHAPE)
  got = D.ddim_sample(jax_model, s, SHAPE, key, eta=eta, noise=x_T)
  x = x_T
  for t in reversed(range(5)):
    x = np_ddim_step(c, tmap, x, t, step_noise(key, t), eta)
  close(f64(got), x, rtol=1e-4, atol=1e-4)


def test_ddim_eta0_is_deterministic():
  s = D.create_schedule(1000, "ddim5")
  x_T = jnp.asarray(RNG.normal(size=SHAPE), jnp.float32)
  sample = jax.jit(lambda key, eta: D.ddim_sample(jax_model, s, SHAPE, key, eta=eta, noise=x_T),
                   static_argnums=1)
  keys = jax.random.key(0), jax.random.key(1)
  np.testing.assert_array_equal(*(sample(k, 0.0) for k in keys))
  assert np.abs(np.subtract(*(f64(sample(k, 1.0)) for k in keys))).max() > 1e-3


# ----------------------------------------------------------------------------- guidance
NUM_CLASSES = 5
EMB = RNG.normal(size=(NUM_CLASSES + 1, 2 * C))


def make_net():
  """A class-conditional linear net returning eps and v in (-1, 1), logging its batch sizes."""
  calls = []
  w = jnp.asarray(RNG.normal(size=(C, 2 * C)) * 0.5, jnp.float32)

  def apply_fn(x, t, y):
    calls.append(x.shape[0])
    bias = jnp.asarray(EMB, jnp.float32)[y] + 0.001 * t[:, None].astype(jnp.float32)
    out = x @ w + bias[:, None, None, :]
    return jnp.concatenate([out[..., :C], jnp.tanh(out[..., C:])], axis=-1)

  return apply_fn, calls


@pytest.mark.parametrize("channels", [None, 3])
def test_cfg_combination(channels):
  apply_fn, calls = make_net()
  x = jnp.asarray(RNG.normal(size=SHAPE), jnp.float32)
  t = jnp.asarray(RNG.integers(0, 1000, size=N), jnp.int32)
  y = jnp.asarray(RNG.integers(0, NUM_CLASSES, size=N), jnp.int32)
  cond = f64(apply_fn(x, t, y))
  uncond = f64(apply_fn(x, t, jnp.full((N,), NUM_CLASSES)))
  calls.clear()
  got = f64(D.cfg_model_fn(apply_fn, y, NUM_CLASSES, 4.0, guidance_channels=channels)(x, t))
  assert calls == [2 * N]  # both halves in one batched call
  k = C if channels is None else channels
  want = cond.copy()
  want[..., :k] = uncond[..., :k] + 4.0 * (cond[..., :k] - uncond[..., :k])
  close(got, want, rtol=1e-5, atol=1e-5)
  traced = jax.jit(lambda s: D.cfg_model_fn(apply_fn, y, NUM_CLASSES, s,
                                             guidance_channels=channels)(x, t))(4.0)
  close(f64(traced), want, rtol=1e-5, atol=1e-5)  # a traced scale: one compile for all scales
  # Channels past k (eps channel 3 under DiT's rule, and the variance) are the conditional ones
  # (to float32 rounding: XLA's CPU matmul may block a batch of 2N rows unlike one of N).
  close(got[..., k:], cond[..., k:], rtol=1e-6, atol=1e-6)
  assert np.abs(got[..., :k] - cond[..., :k]).max() > 1e-2


def test_cfg_scale_one_is_conditional_only():
  apply_fn, calls = make_net()
  x = jnp.asarray(RNG.normal(size=SHAPE), jnp.float32)
  t, y = jnp.arange(N), jnp.asarray([0, 1, 2, 3])
  want = f64(apply_fn(x, t, y))
  calls.clear()
  got = f64(D.cfg_model_fn(apply_fn, y, NUM_CLASSES, 1.0)(x, t))
  assert calls == [N]
  np.testing.assert_array_equal(got, want)


def test_cfg_drives_a_sampler():
  """The guided model_fn plugs into the jitted sampler; result matches a hand-guided numpy loop."""
  apply_fn, _ = make_net()
  s, c, tmap = respaced(3)
  y = jnp.asarray([1, 2, 3, 4])
  x_T, key = RNG.normal(size=SHAPE), jax.random.key(5)
  got = jax.jit(lambda k: D.ddpm_sample(D.cfg_model_fn(apply_fn, y, NUM_CLASSES, 1.5), s, SHAPE, k,
                                        noise=x_T))(key)
  x = x_T
  for t in reversed(range(3)):
    tt = jnp.full((N,), tmap[t])
    xj = jnp.asarray(x, jnp.float32)
    cond, uncond = f64(apply_fn(xj, tt, y)), f64(apply_fn(xj, tt, jnp.full((N,), NUM_CLASSES)))
    out = np.concatenate([uncond[..., :C] + 1.5 * (cond[..., :C] - uncond[..., :C]),
                          cond[..., C:]], axis=-1)
    mean, log_var, _ = np_p_mean_var(c, out, x, np.full(N, t))
    x = mean + (t > 0) * np.exp(0.5 * log_var) * step_noise(key, t)
  close(f64(got), x, rtol=1e-4, atol=1e-4)
