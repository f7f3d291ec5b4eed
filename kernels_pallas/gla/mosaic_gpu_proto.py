"""EXPERIMENT (kept in git history, reverted in the next commit): GLA forward and backward as
Mosaic GPU kernels on Hopper, one warpgroup per (batch, head), 64-row chunks on wgmma.

Every exponent a chunk needs is a product of a constant {-1, 0, 1} matrix with g, g split into
three bf16 parts (exact to float32), on the tensor cores (Mosaic GPU lowers no cumsum). In-chunk
scores in 16-row sub-blocks: pairs of different sub-blocks anchored at the start of the query's
sub-block (both factors <= 1), diagonal sub-blocks at their middle (per-step log-decay floored
at -10, as pallas_gpu's DIAG = 16 scheme). Float32 operands of products with a state, a state
gradient or a score gradient are split into two bf16 parts (tf32 for the forward's q * exp(G)
times the state). Limits: bf16 inputs, K = 32, V = 64, T a multiple of 64, reverse=False, zero
initial state, one block per sequence; the backward reads the forward's per-chunk states.
Measured on an H100 (BENCHMARKS.md, session 20): correct, 1.8x (forward) to 4x (backward) slower
than pallas_gpu.
"""
import functools
import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

C = 64
SB = 16
FLOOR = -10.0
f32, bf16 = jnp.float32, jnp.bfloat16
WG = plgpu.Layout.WGMMA


def _sm(shape, dtype, sw=None):
  row_bytes = shape[-1] * jnp.dtype(dtype).itemsize
  sw = sw or min(128, row_bytes)
  return (plgpu.TilingTransform((8, sw // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(sw))


def _iotas():
  i = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=WG)
  s = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=WG)
  return i, s


def _ones(cond):
  return jnp.where(cond, 1.0, 0.0).astype(f32)


def _const(name):
  """The {-1, 0, 1} matrix whose product with g gives one offset array."""
  i, s = _iotas()
  le = _ones(s <= i)
  if name == "G":
    m = le
  elif name == "total":
    m = _ones(s >= 0)
  elif name == "diag":
    mid = (i // SB) * SB + (SB // 2 - 1)
    m = le - _ones(s <= mid)
  else:  # anchor a: offsets from the boundary just before row a
    a = int(name[1:])
    m = le - _ones(s <= a - 1)
  return m.astype(bf16)


def _mask(name):
  i, j = _iotas()
  bi, bj = i // SB, j // SB
  if name == "diag":
    return (bi == bj) & (j <= i)
  a = int(name[1:])
  return (bi == a // SB) & (bj < bi)


def _factors(o_n, name):
  """Query and key factors of one score term (both <= 1 but on the diagonal sub-blocks)."""
  if name == "diag":
    o_n = jnp.clip(o_n, -80.0, 80.0)
    return jnp.exp(o_n), jnp.exp(-o_n)
  return jnp.exp(jnp.minimum(o_n, 0.0)), jnp.exp(jnp.minimum(-o_n, 0.0))


def _product(m, gp_smem):
  def run(acc_ref):
    for p in range(3):
      plgpu.wgmma(acc_ref, m, gp_smem.at[p])
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC((C, gp_smem.shape[-1]), f32))


def gla_forward(q, k, v, g, scale=None, batched=False, states=False):
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  scale = kd ** -0.5 if scale is None else scale
  assert t % C == 0 and kd == 32 and vd == 64, (q.shape, v.shape)
  n_chunks = t // C

  def kernel(q_ref, k_ref, v_ref, g_ref, o_ref, st_ref, *refs):
    if states:
      states_ref, *refs = refs
    (gp_smem, kf_smem, qe_smem, stt_smem, kek_smem, stout_smem, kf4_smem) = refs
    _kernel(q_ref, k_ref, v_ref, g_ref, o_ref, st_ref, states_ref if states else None, gp_smem, kf_smem, qe_smem, stt_smem,
             kek_smem, stout_smem, kf4_smem)

  def _kernel(q_ref, k_ref, v_ref, g_ref, o_ref, st_ref, states_ref, gp_smem, kf_smem, qe_smem,
              stt_smem, kek_smem, stout_smem, kf4_smem):
    bi, hi = lax.axis_index("b"), lax.axis_index("h")
    stt_smem[...] = plgpu.layout_cast(jnp.zeros((vd, kd), f32), WG)
    plgpu.commit_smem()

    def body(_, q_s, k_s, v_s, g_s, o_s, *rest):
      *st_out, state_t = rest
      if st_out:
        st_out[0][...] = state_t
      g = jnp.maximum(plgpu.load(g_s, (), layout=WG), FLOOR)
      g1 = g.astype(bf16)
      r = g - g1.astype(f32)
      g2 = r.astype(bf16)
      g3 = (r - g2.astype(f32)).astype(bf16)
      gp_smem[0] = g1
      gp_smem[1] = g2
      gp_smem[2] = g3
      plgpu.commit_smem()
      names = ("G", "total", "a16", "a32", "a48", "diag")
      if batched:  # all products issued, one wait
        def run_all(*acc_refs):
          for n, acc_ref in zip(names, acc_refs):
            m = _const(n)
            for p in range(3):
              plgpu.wgmma(acc_ref, m, gp_smem.at[p])
          return [a[...] for a in acc_refs]
        off = dict(zip(names, pl.run_scoped(run_all, *[plgpu.ACC((C, kd), f32)] * 6)))
      else:
        off = {n: _product(_const(n), gp_smem) for n in names}
      qf32 = plgpu.load(q_s, (), layout=WG).astype(f32)
      kf32 = plgpu.load(k_s, (), layout=WG).astype(f32)
      qe_smem[...] = qf32 * jnp.exp(off["G"])
      scores = plgpu.layout_cast(jnp.zeros((C, C), f32), WG)
      if batched:
        qfs = []
        for idx, n in enumerate(("a16", "a32", "a48", "diag")):
          fq, fk = _factors(off[n], n)
          kf4_smem[idx] = (kf32 * fk).astype(bf16)
          qfs.append((qf32 * fq).astype(bf16))
        plgpu.commit_smem()

        def run_sc(*acc_refs):
          for idx, acc_ref in enumerate(acc_refs):
            plgpu.wgmma(acc_ref, qfs[idx], plgpu.transpose_ref(kf4_smem.at[idx], (1, 0)))
          return [a[...] for a in acc_refs]
        s_all = pl.run_scoped(run_sc, *[plgpu.ACC((C, C), f32)] * 4)
        for n, s_n in zip(("a16", "a32", "a48", "diag"), s_all):
          scores = jnp.where(_mask(n), s_n, scores)
      for n in (() if batched else ("a16", "a32", "a48", "diag")):
        fq, fk = _factors(off[n], n)
        kf_smem[...] = (kf32 * fk).astype(bf16)
        plgpu.commit_smem()
        qf = (qf32 * fq).astype(bf16)

        def run(acc_ref, qf=qf):
          plgpu.wgmma(acc_ref, qf, plgpu.transpose_ref(kf_smem, (1, 0)))
          return acc_ref[...]
        s_n = pl.run_scoped(run, plgpu.ACC((C, C), f32))
        scores = jnp.where(_mask(n), s_n, scores)
      plgpu.commit_smem()

      def run_o(acc_ref):
        plgpu.wgmma(acc_ref, scores.astype(bf16), v_s)
        plgpu.wgmma(acc_ref, qe_smem, plgpu.transpose_ref(stt_smem, (1, 0)))
        return acc_ref[...]
      o = pl.run_scoped(run_o, plgpu.ACC((C, vd), f32))
      o_s[...] = (scale * o).astype(o_s.dtype)
      kek = kf32 * jnp.exp(off["total"] - off["G"])
      kek_hi = kek.astype(bf16)
      kek_smem[0] = kek_hi
      kek_smem[1] = (kek - kek_hi.astype(f32)).astype(bf16)
      plgpu.commit_smem()

      def run_s(acc_ref):
        vt = plgpu.transpose_ref(v_s, (1, 0))
        plgpu.wgmma(acc_ref, vt, kek_smem.at[0])
        plgpu.wgmma(acc_ref, vt, kek_smem.at[1])
      # state_t rows are V, columns K; off["total"] is [C, K] with every row the chunk total
      state_t = pl.run_state(run_s)(plgpu.ACC.init(state_t * jnp.exp(off["total"])))
      stt_smem[...] = state_t
      plgpu.commit_smem()
      return state_t

    spec = lambda d, dt, sw=None: plgpu.BlockSpec((C, d), lambda c: (c, 0),
                                                  transforms=_sm((C, d), dt, sw))
    pipeline = plgpu.emit_pipeline(
        body, grid=(n_chunks,),
        in_specs=[spec(kd, q.dtype), spec(kd, k.dtype), spec(vd, v.dtype, 64), spec(kd, f32)],
        out_specs=[spec(vd, q.dtype)] + ([plgpu.BlockSpec(
            (vd, kd), lambda c: (c, 0), transforms=_sm((vd, kd), f32))] if states else []),
        max_concurrent_steps=2,
        init_carry=plgpu.layout_cast(jnp.zeros((vd, kd), f32), WG))
    state_t = pipeline(q_ref.at[bi, :, hi, :], k_ref.at[bi, :, hi, :], v_ref.at[bi, :, hi, :],
                       g_ref.at[bi, :, hi, :], o_ref.at[bi, :, hi, :],
                       *([states_ref.at[bi, hi]] if states else []))
    stout_smem[...] = state_t
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stout_smem, st_ref.at[bi, hi])
    plgpu.wait_smem_to_gmem(0)

  outs = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((b, t, h, vd), q.dtype),
                jax.ShapeDtypeStruct((b, h, vd, kd), f32))
      + ((jax.ShapeDtypeStruct((b, h, n_chunks * vd, kd), f32),) if states else ()),
      grid=(b, h), grid_names=("b", "h"),
      scratch_types=(plgpu.SMEM((3, C, kd), bf16, transforms=_sm((C, kd), bf16)),
                     plgpu.SMEM((C, kd), bf16, transforms=_sm((C, kd), bf16)),
                     plgpu.SMEM((C, kd), f32, transforms=_sm((C, kd), f32)),
                     plgpu.SMEM((vd, kd), f32, transforms=_sm((vd, kd), f32)),
                     plgpu.SMEM((2, C, kd), bf16, transforms=_sm((C, kd), bf16)),
                     plgpu.SMEM((vd, kd), f32),
                     plgpu.SMEM((4 if batched else 1, C, kd), bf16, transforms=_sm((C, kd), bf16))),
  )(q, k, v, g)
  o, st_t = outs[:2]
  if states:
    return o, jnp.swapaxes(st_t, -1, -2), outs[2]
  return o, jnp.swapaxes(st_t, -1, -2)



def _split2(x):
  hi = x.astype(bf16)
  return hi, (x - hi.astype(f32)).astype(bf16)


def _split3(x):
  p1 = x.astype(bf16)
  r = x - p1.astype(f32)
  p2 = r.astype(bf16)
  return p1, p2, (r - p2.astype(f32)).astype(bf16)


def _suffix():  # U[i, s] = 1 where s >= i: U @ x is the in-chunk suffix sum
  i, s = _iotas()
  return _ones(s >= i).astype(bf16)


def _all_ones():
  i, s = _iotas()
  return _ones(s >= 0).astype(bf16)


def _acc(fn, shape):
  return pl.run_scoped(fn, plgpu.ACC(shape, f32))


def gla_backward(q, k, v, g, do, states_t, scale=None):
  """states_t [B, H, NC * V, K]: the state entering every chunk, transposed."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  scale = kd ** -0.5 if scale is None else scale
  n_chunks = t // C

  def kernel(q_ref, k_ref, v_ref, g_ref, do_ref, st_ref, dq_ref, dk_ref, dv_ref, dg_ref,
             gp_smem, sthl, dsthl, a_smem, kf_smem, dan, kfn, qfn, qe_smem):
    bi, hi = lax.axis_index("b"), lax.axis_index("h")

    def body(_, q_s, k_s, v_s, g_s, do_s, st_s, dq_s, dk_s, dv_s, dg_s, carry):
      dst_t, dgc = carry
      g = jnp.maximum(plgpu.load(g_s, (), layout=WG), FLOOR)
      for p, part in enumerate(_split3(g)):
        gp_smem[p] = part
      st_t = plgpu.load(st_s, (), layout=WG)
      for p, part in enumerate(_split2(st_t)):
        sthl[p] = part
      for p, part in enumerate(_split2(dst_t)):
        dsthl[p] = part
      plgpu.commit_smem()
      names = ("G", "total", "a16", "a32", "a48", "diag")

      def run_off(*refs):
        for n, r in zip(names, refs):
          m = _const(n)
          for p in range(3):
            plgpu.wgmma(r, m, gp_smem.at[p])
        return [r[...] for r in refs]
      off = dict(zip(names, pl.run_scoped(run_off, *[plgpu.ACC((C, kd), f32)] * 6)))
      eq, ek, decay = jnp.exp(off["G"]), jnp.exp(off["total"] - off["G"]), jnp.exp(off["total"])
      q32 = plgpu.load(q_s, (), layout=WG).astype(f32)
      k32 = plgpu.load(k_s, (), layout=WG).astype(f32)

      def run_state_terms(da_ref, dqi_ref, dki_ref):
        plgpu.wgmma(da_ref, do_s, plgpu.transpose_ref(v_s, (1, 0)))
        for p in range(2):
          plgpu.wgmma(dqi_ref, do_s, sthl.at[p])
          plgpu.wgmma(dki_ref, v_s, dsthl.at[p])
        return da_ref[...], dqi_ref[...], dki_ref[...]
      da, dq, dk = pl.run_scoped(run_state_terms, plgpu.ACC((C, C), f32),
                                 plgpu.ACC((C, kd), f32), plgpu.ACC((C, kd), f32))
      i, j = _iotas()
      da = jnp.where(j <= i, scale * da, 0.0)
      dq = scale * eq * dq
      dk = ek * dk
      # scores, as the forward
      scores = plgpu.layout_cast(jnp.zeros((C, C), f32), WG)
      for n in ("a16", "a32", "a48", "diag"):
        fq, fk = _factors(off[n], n)
        kf_smem[...] = (k32 * fk).astype(bf16)
        plgpu.commit_smem()
        qf = (q32 * fq).astype(bf16)

        def run(acc_ref, qf=qf):
          plgpu.wgmma(acc_ref, qf, plgpu.transpose_ref(kf_smem, (1, 0)))
          return acc_ref[...]
        scores = jnp.where(_mask(n), _acc(run, (C, C)), scores)
      a_smem[...] = (scale * scores).astype(bf16)
      plgpu.commit_smem()
      kek_hi, kek_lo = _split2(k32 * ek)

      def run_dv(acc_ref):
        plgpu.wgmma(acc_ref, plgpu.transpose_ref(a_smem, (1, 0)), do_s)
        plgpu.wgmma(acc_ref, kek_hi, plgpu.transpose_ref(dsthl.at[0], (1, 0)))
        plgpu.wgmma(acc_ref, kek_lo, plgpu.transpose_ref(dsthl.at[0], (1, 0)))
        plgpu.wgmma(acc_ref, kek_hi, plgpu.transpose_ref(dsthl.at[1], (1, 0)))
        return acc_ref[...]
      dv = _acc(run_dv, (C, vd))
      for n in ("a16", "a32", "a48", "diag"):
        fq, fk = _factors(off[n], n)
        da_n = jnp.where(_mask(n), da, 0.0)
        da_hi, da_lo = _split2(da_n)
        dan[0] = da_hi
        dan[1] = da_lo
        for p, part in enumerate(_split2(k32 * fk)):
          kfn[p] = part
        for p, part in enumerate(_split2(q32 * fq)):
          qfn[p] = part
        plgpu.commit_smem()

        def run_terms(dq_ref, dk_ref, da_hi=da_hi, da_lo=da_lo):
          plgpu.wgmma(dq_ref, da_hi, kfn.at[0])
          plgpu.wgmma(dq_ref, da_lo, kfn.at[0])
          plgpu.wgmma(dq_ref, da_hi, kfn.at[1])
          plgpu.wgmma(dk_ref, plgpu.transpose_ref(dan.at[0], (1, 0)), qfn.at[0])
          plgpu.wgmma(dk_ref, plgpu.transpose_ref(dan.at[1], (1, 0)), qfn.at[0])
          plgpu.wgmma(dk_ref, plgpu.transpose_ref(dan.at[0], (1, 0)), qfn.at[1])
          return dq_ref[...], dk_ref[...]
        tq, tk = pl.run_scoped(run_terms, plgpu.ACC((C, kd), f32), plgpu.ACC((C, kd), f32))
        dq = dq + fq * tq
        dk = dk + fk * tk
      x = q32 * dq - k32 * dk
      for p, part in enumerate(_split3(x)):
        gp_smem[p] = part
      for p, part in enumerate(_split2(scale * q32 * eq)):
        qe_smem[p] = part
      plgpu.commit_smem()

      def run_dg(sfx_ref, tot_ref):
        u, ones = _suffix(), _all_ones()
        for p in range(3):
          plgpu.wgmma(sfx_ref, u, gp_smem.at[p])
          plgpu.wgmma(tot_ref, ones, gp_smem.at[p])
        return sfx_ref[...], tot_ref[...]
      sfx, tot = pl.run_scoped(run_dg, plgpu.ACC((C, kd), f32), plgpu.ACC((C, kd), f32))

      def run_ds(acc_ref):
        dot = plgpu.transpose_ref(do_s, (1, 0))
        plgpu.wgmma(acc_ref, dot, qe_smem.at[0])
        plgpu.wgmma(acc_ref, dot, qe_smem.at[1])
      dst_t = pl.run_state(run_ds)(plgpu.ACC.init(dst_t * decay))
      dq_s[...] = dq.astype(dq_s.dtype)
      dk_s[...] = dk.astype(dk_s.dtype)
      dv_s[...] = dv.astype(dv_s.dtype)
      dg_s[...] = sfx + dgc
      return dst_t, dgc + tot

    rev = lambda c: (n_chunks - 1 - c, 0)
    spec = lambda d, dt, sw=None: plgpu.BlockSpec((C, d), rev, transforms=_sm((C, d), dt, sw))
    st_spec = plgpu.BlockSpec((vd, kd), rev, transforms=_sm((vd, kd), f32))
    zeros = plgpu.layout_cast(jnp.zeros((vd, kd), f32), WG)
    pipeline = plgpu.emit_pipeline(
        body, grid=(n_chunks,),
        in_specs=[spec(kd, bf16), spec(kd, bf16), spec(vd, bf16, 64), spec(kd, f32),
                  spec(vd, bf16, 64), st_spec],
        out_specs=[spec(kd, bf16), spec(kd, bf16), spec(vd, bf16, 64), spec(kd, f32)],
        max_concurrent_steps=2,
        init_carry=(zeros, plgpu.layout_cast(jnp.zeros((C, kd), f32), WG)))
    sl = lambda r: r.at[bi, :, hi, :]
    pipeline(sl(q_ref), sl(k_ref), sl(v_ref), sl(g_ref), sl(do_ref), st_ref.at[bi, hi],
             sl(dq_ref), sl(dk_ref), sl(dv_ref), sl(dg_ref))

  sh = lambda x, dt: jax.ShapeDtypeStruct(x.shape, dt)
  return plgpu.kernel(
      kernel,
      out_type=(sh(q, q.dtype), sh(k, k.dtype), sh(v, v.dtype), sh(g, f32)),
      grid=(b, h), grid_names=("b", "h"),
      scratch_types=(plgpu.SMEM((3, C, kd), bf16, transforms=_sm((C, kd), bf16)),
                     plgpu.SMEM((2, vd, kd), bf16, transforms=_sm((vd, kd), bf16)),
                     plgpu.SMEM((2, vd, kd), bf16, transforms=_sm((vd, kd), bf16)),
                     plgpu.SMEM((C, C), bf16, transforms=_sm((C, C), bf16, 64)),
                     plgpu.SMEM((C, kd), bf16, transforms=_sm((C, kd), bf16)),
                     plgpu.SMEM((2, C, C), bf16, transforms=_sm((C, C), bf16, 64)),
                     plgpu.SMEM((2, C, kd), bf16, transforms=_sm((C, kd), bf16)),
                     plgpu.SMEM((2, C, kd), bf16, transforms=_sm((C, kd), bf16)),
                     plgpu.SMEM((2, C, kd), bf16, transforms=_sm((C, kd), bf16))),
  )(q, k, v, g, do, states_t)

