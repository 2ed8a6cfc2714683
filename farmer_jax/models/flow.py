"""Autoregressive affine flow blocks over token sequences (SPEC sec. 2).

One block maps a sequence x [B, N, D] to z [B, N, D] in its processing order (natural, or reversed
when `flip`):

    z_i = (x_i - mu(x_<i)) * exp(-a(x_<i)),       logdet = -sum_i sum_j a(x_<i)_j

`mu, a` come from a causal Transformer whose output at position i sees only tokens < i: either the
sequence is shifted right behind a learned start vector (ours, `start_token=True`, every token is
transformed) or the outputs are shifted and token 1 is left unchanged (the paper's form). The output
projection is zero-initialised, so every block is exactly the identity at initialisation.

The affine step and the logdet always run in float32, whatever the Transformer's compute dtype.

Distillation (SPEC sec. 6): a block built with `causal=False` is a one-step student of the
teacher block with the same parameters. `student_inverse` reads z (all of it: bidirectional
attention) through the teacher's input layout and inverts in one parallel pass with the teacher's
affine form, x = z * exp(a(z)) + mu(z). The exact inverse has this form with mu, a functions of
z_<i, so a student initialised from the teacher starts close to it and needs no new parameters.

Parallel inverse (`inverse_parallel`, docs/jacobi.md): a block's inverse is the triangular
fixed-point system x = z * exp(a(x)) + mu(x) in which position i's right side reads only x_<i.
Jacobi iteration updates every position at once from the previous iterate, one causal pass per
iteration: after k passes positions < k are exact whatever the start, so N passes give the
sequential inverse, and a good start stops far earlier on a tolerance. Gauss-Seidel-Jacobi cuts
the positions into segments solved in order, each by Jacobi, the segments before it fixed and
held in the KV cache. Strided sweeps transpose that: sequential inside the segments, Jacobi across
them; each step decodes one position of every segment, so a sweep of S steps solves each
segment's own chain exactly and only the reads across segment boundaries iterate.
"""
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.models import layers


def soft_clip(a_raw: jax.Array, clip: float) -> jax.Array:
  """c * tanh(a / c) bounds the log-scale to (-c, c) smoothly; clip <= 0 disables it."""
  return clip * jnp.tanh(a_raw / clip) if clip > 0 else a_raw


def block_flips(t: int) -> bool:
  """Block t reverses the token order on entry and restores it on exit for odd t (TARFlow's pattern)."""
  return t % 2 == 1


def last_block_flips(num_blocks: int) -> bool:
  return num_blocks > 0 and block_flips(num_blocks - 1)


INVERSES = ("sequential", "jacobi", "gs_jacobi", "strided")   # sample.inverse
JACOBI_INITS = ("z", "previous", "student")         # sample.jacobi_init


@dataclasses.dataclass(frozen=True)
class ParallelInverse:
  """How `Flow.inverse_parallel` solves every block (hashable: part of the sampler's jit key).

  method: "jacobi" (one segment per block), "gs_jacobi" or "strided" (`segments`).
  segments: segment count per block t = 0 .. n-1 (forward order: block 0 is next to the pixels),
    or one count for every block.
  tolerance: a segment (strided: a block) stops once max |x^k - x^(k-1)| over the batch is <=
    this ([-1, 1] units), k counting passes (strided: sweeps).
  max_iterations: cap on the passes of one segment; 0 (or more than its length): its length, at
    which Jacobi is exact whatever the tolerance. Strided: cap on the sweeps; 0 (or more than
    the segment count): the segment count, at which the sweeps are exact.
  init: the start x^0 of block t: "z", the latent the whole flow inverts (every block);
    "previous", the block's own input, i.e. the output of the block inverted before it;
    "student", the distilled student's one-pass inverse of that input.
  """
  method: str = "jacobi"
  segments: tuple[int, ...] = (1,)
  tolerance: float = 0.0
  max_iterations: int = 0
  init: str = "previous"

  def block_segments(self, t: int) -> int:
    return self.segments[t] if len(self.segments) > 1 else self.segments[0]


class AffineBlock(nn.Module):
  """One AF block f_t. Call maps data-side x [B, N, D] -> (z [B, N, D], logdet [B]), natural order."""
  token_dim: int
  num_tokens: int
  width: int
  depth: int
  flip: bool
  head_dim: int = 64
  mlp_ratio: int = 4
  start_token: bool = True
  logscale_clip: float = 4.0
  num_classes: int = 0          # > 0: class-conditional block (ours, optional); labels in [0, C]
  dtype: Any = jnp.float32
  scan_layers: bool = False     # see layers.Transformer
  remat: str = "none"
  attention: str = "einsum"     # layers.ATTENTION
  causal: bool = True           # False: the distilled one-step student of this block (SPEC sec. 6)

  def setup(self):
    self.embed = layers.dense(self.width, (None, layers.EMBED), self.dtype, "embed")
    self.pos = self.param("pos", layers.param_init(nn.initializers.normal(0.02), None, layers.EMBED),
                          (self.num_tokens, self.width))
    if self.start_token:
      self.start = self.param("start", layers.param_init(nn.initializers.normal(0.02), layers.EMBED),
                              (self.width,))
    if self.num_classes > 0:
      self.class_embed = nn.Embed(
          self.num_classes + 1, self.width, name="class_embed",
          embedding_init=layers.param_init(nn.linear.default_embed_init, layers.VOCAB, layers.EMBED))
    self.transformer = layers.Transformer(self.width, self.depth, self.head_dim, self.mlp_ratio,
                                          causal=self.causal, dtype=self.dtype,
                                          scan_layers=self.scan_layers, remat=self.remat,
                                          attention=self.attention, name="transformer")
    # Zero-initialised: every block starts as the identity (SPEC sec. 2). Its float32 result
    # feeds the affine step directly.
    self.head = layers.dense(2 * self.token_dim, (layers.EMBED, layers.OUT), self.dtype, "head",
                             kernel_init=nn.initializers.zeros, out_dtype=jnp.float32)

  def affine_params(self, x_BxNxD: jax.Array, labels_B: jax.Array | None):
    """Shift and log-scale for every token from its strict prefix, processing order, float32."""
    h_BxNxW = self.embed(x_BxNxD.astype(self.dtype))
    if self.start_token:
      start = jnp.broadcast_to(self.start.astype(h_BxNxW.dtype), (h_BxNxW.shape[0], 1, self.width))
      h_BxNxW = jnp.concatenate([start, h_BxNxW[:, :-1]], axis=1)
    h_BxNxW = h_BxNxW + self.pos.astype(h_BxNxW.dtype)
    if self.num_classes > 0:
      h_BxNxW = h_BxNxW + self.class_embed(labels_B)[:, None].astype(h_BxNxW.dtype)
    out_BxNx2D = self.head(self.transformer(h_BxNxW))
    if not self.start_token:
      # Output i has seen tokens <= i, so it parameterises token i + 1; token 1 stays as it is.
      out_BxNx2D = jnp.concatenate([jnp.zeros_like(out_BxNx2D[:, :1]), out_BxNx2D[:, :-1]], axis=1)
    mu_BxNxD, a_raw_BxNxD = jnp.split(out_BxNx2D, 2, axis=-1)
    return mu_BxNxD, soft_clip(a_raw_BxNxD, self.logscale_clip)

  def _order(self, x_BxNxD: jax.Array) -> jax.Array:
    return x_BxNxD[:, ::-1] if self.flip else x_BxNxD

  def _decode_inputs(self, v_BxTxD: jax.Array, positions_T: jax.Array, pos_TxW: jax.Array,
                     labels_B: jax.Array | None) -> jax.Array:
    """Transformer inputs [B, T, W] at `positions_T` of the inverse: position j reads token
    v_j = x_(j - 1) (the start vector instead at j = 0 with a start token) and emits the
    parameters of the token it decodes (`inverse`, `inverse_parallel`)."""
    h_BxTxW = self.embed(v_BxTxD.astype(self.dtype))
    if self.start_token:
      h_BxTxW = jnp.where((positions_T == 0)[None, :, None], self.start.astype(h_BxTxW.dtype),
                          h_BxTxW)
    h_BxTxW = h_BxTxW + pos_TxW.astype(h_BxTxW.dtype)
    if self.num_classes > 0:
      h_BxTxW = h_BxTxW + self.class_embed(labels_B)[:, None].astype(h_BxTxW.dtype)
    return h_BxTxW

  def _emit(self, out_BxTxW: jax.Array, z_BxTxD: jax.Array) -> jax.Array:
    """x = z * exp(a) + mu from the Transformer's output at the emitting positions, float32."""
    mu_BxTxD, a_raw_BxTxD = jnp.split(self.head(out_BxTxW), 2, axis=-1)
    return z_BxTxD * jnp.exp(soft_clip(a_raw_BxTxD, self.logscale_clip)) + mu_BxTxD

  def __call__(self, x_BxNxD: jax.Array, labels_B: jax.Array | None = None):
    x_BxNxD = self._order(x_BxNxD.astype(jnp.float32))
    mu_BxNxD, a_BxNxD = self.affine_params(x_BxNxD, labels_B)
    z_BxNxD = (x_BxNxD - mu_BxNxD) * jnp.exp(-a_BxNxD)
    logdet_B = -jnp.sum(a_BxNxD, axis=(1, 2))
    return self._order(z_BxNxD), logdet_B

  def student_inverse(self, z_BxNxD: jax.Array, labels_B: jax.Array | None = None) -> jax.Array:
    """One parallel pass z [B, N, D] -> x [B, N, D] (natural order): x = z * exp(a(z)) + mu(z).

    The student's approximation of `inverse` (for a block built with causal=False; with
    causal=True it is the teacher's network read on z instead of x, which is not the inverse).
    """
    z_BxNxD = self._order(z_BxNxD.astype(jnp.float32))
    mu_BxNxD, a_BxNxD = self.affine_params(z_BxNxD, labels_B)
    return self._order(z_BxNxD * jnp.exp(a_BxNxD) + mu_BxNxD)

  def inverse(self, z_BxNxD: jax.Array, labels_B: jax.Array | None = None) -> jax.Array:
    """Exact sequential inverse with a KV cache: one Transformer pass of one token per step.

    A `lax.scan` over positions carries preallocated per-layer keys / values [B, H, N, K]; step j
    feeds the token decoded at step j - 1 (or the start vector) at position j and decodes the next
    token from the parameters it emits. N steps of O(N) attention instead of N full passes.
    """
    z_BxNxD = self._order(z_BxNxD.astype(jnp.float32))
    b, n, _ = z_BxNxD.shape
    caches = self.transformer.init_cache(b, n)
    # With a start token, step j emits token j. Without one, token 0 passes unchanged and step j
    # (fed token j) emits token j + 1.
    first = 0 if self.start_token else 1
    x_prev_BxD = z_BxNxD[:, 0]

    def step(block, carry, j, z_BxNxD, labels_B):
      caches, x_prev_BxD = carry
      pos_1xW = jax.lax.dynamic_index_in_dim(block.pos, j, keepdims=True)
      h_Bx1xW = block._decode_inputs(x_prev_BxD[:, None], j[None], pos_1xW, labels_B)
      out_Bx1xW, caches = block.transformer(h_Bx1xW, caches, j)
      z_t_Bx1xD = jax.lax.dynamic_slice_in_dim(z_BxNxD, j + first, 1, axis=1)
      x_t_BxD = block._emit(out_Bx1xW, z_t_Bx1xD)[:, 0]
      return (caches, x_t_BxD), x_t_BxD

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(0, nn.broadcast, nn.broadcast), out_axes=1)
    _, x_BxTxD = scan(self, (caches, x_prev_BxD), jnp.arange(n - first), z_BxNxD, labels_B)
    if not self.start_token:
      x_BxTxD = jnp.concatenate([z_BxNxD[:, :1], x_BxTxD], axis=1)
    return self._order(x_BxTxD)

  def inverse_parallel(self, z_BxNxD: jax.Array, labels_B: jax.Array | None, x0_BxNxD: jax.Array,
                       segments: int = 1, tolerance: float = 0.0, max_iterations: int = 0
                       ) -> tuple[jax.Array, jax.Array]:
    """Gauss-Seidel-Jacobi inverse from the start x0 (both natural order) -> (x [B, N, D],
    passes used, int32 []); one segment is plain Jacobi.

    The P positions that emit a token (N with a start token; N - 1 without, token 0 passing
    unchanged) are cut into R runs of S = ceil(P / segments) positions, the last padded to
    Q = R * S. A `lax.scan` over the runs carries the KV caches [B, H, Q, K] and the unknowns
    u_BxQxD; run r iterates, in a `lax.while_loop`, one causal pass over its S positions
    (attending to the cached keys of the runs before it) until the batch's max abs change is
    <= `tolerance` or it has made min(cap, its length) passes, its length being where the
    triangular system is solved exactly. At that stop the cache holds the keys of the last
    pass's inputs: exact at the cap, within the tolerance otherwise.
    """
    z_BxNxD = self._order(z_BxNxD.astype(jnp.float32))
    x0_BxNxD = self._order(x0_BxNxD.astype(jnp.float32))
    b, n, _ = z_BxNxD.shape
    first = 0 if self.start_token else 1
    p = n - first
    seg = -(-p // max(1, min(segments, p)))
    runs = -(-p // seg)
    pad = [(0, 0), (0, runs * seg - p), (0, 0)]
    # Position j emits token u_j = x_(j + first) from token v_j = x_(j + first - 1).
    zu_BxQxD = jnp.pad(z_BxNxD[:, first:], pad)
    u_BxQxD = jnp.pad(x0_BxNxD[:, first:], pad)
    pos_QxW = jnp.pad(self.pos[:p], [(0, runs * seg - p), (0, 0)])
    v0_BxD = z_BxNxD[:, 0]   # what position 0 reads without a start token (ignored with one)
    caches = self.transformer.init_cache(b, runs * seg)
    cap = seg if max_iterations <= 0 else min(max_iterations, seg)

    def run(block, carry, r, labels_B):
      caches, u_BxQxD = carry
      lo = r * seg
      positions_S = lo + jnp.arange(seg)
      valid_S = positions_S < p
      length = jnp.minimum(seg, p - lo)
      zs_BxSxD = jax.lax.dynamic_slice_in_dim(zu_BxQxD, lo, seg, axis=1)
      pos_SxW = jax.lax.dynamic_slice_in_dim(pos_QxW, lo, seg, axis=0)
      prev_BxD = jnp.where(lo == 0, v0_BxD,
                           jax.lax.dynamic_index_in_dim(u_BxQxD, jnp.maximum(lo - 1, 0), axis=1,
                                                        keepdims=False))

      def one_pass(block, state):
        k, us_BxSxD, caches, _ = state
        v_BxSxD = jnp.concatenate([prev_BxD[:, None], us_BxSxD[:, :-1]], axis=1)
        h_BxSxW = block._decode_inputs(v_BxSxD, positions_S, pos_SxW, labels_B)
        out_BxSxW, caches = block.transformer(h_BxSxW, caches, lo)
        new_BxSxD = jnp.where(valid_S[None, :, None], block._emit(out_BxSxW, zs_BxSxD), 0.0)
        change = jnp.max(jnp.abs(new_BxSxD - us_BxSxD))
        return k + 1, new_BxSxD, caches, change

      def going(block, state):
        k, _, _, change = state
        return (k < jnp.minimum(cap, length)) & (change > tolerance)

      us0_BxSxD = jnp.where(valid_S[None, :, None],
                            jax.lax.dynamic_slice_in_dim(u_BxQxD, lo, seg, axis=1), 0.0)
      k, us_BxSxD, caches, _ = nn.while_loop(
          going, one_pass, block, (jnp.int32(0), us0_BxSxD, caches, jnp.float32(jnp.inf)))
      u_BxQxD = jax.lax.dynamic_update_slice_in_dim(u_BxQxD, us_BxSxD, lo, axis=1)
      return (caches, u_BxQxD), k

    scan = nn.scan(run, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=(0, nn.broadcast))
    (_, u_BxQxD), passes_R = scan(self, (caches, u_BxQxD), jnp.arange(runs), labels_B)
    x_BxNxD = u_BxQxD[:, :p]
    if not self.start_token:
      x_BxNxD = jnp.concatenate([z_BxNxD[:, :1], x_BxNxD], axis=1)
    return self._order(x_BxNxD), jnp.sum(passes_R)

  def inverse_strided(self, z_BxNxD: jax.Array, labels_B: jax.Array | None, x0_BxNxD: jax.Array,
                      segments: int, tolerance: float = 0.0, max_sweeps: int = 0
                      ) -> tuple[jax.Array, jax.Array]:
    """Strided sweeps from the start x0 (both natural order) -> (x [B, N, D], sweeps, int32 []):
    sequential inside R segments, Jacobi across them.

    The P emitting positions are cut into R runs of S = ceil(P / segments) (the last padded). One
    full causal pass over the start fills the KV cache [B, H, Q, K] and gives the first iterate;
    then each sweep makes S steps, step j decoding position r * S + j of every run r at once from
    the latest values before it: its own run's earlier positions from this sweep (the sequential
    inverse's dependence, solved exactly in one sweep), the earlier runs' from this sweep below
    offset j and from the last sweep at and above it. Sweep s leaves runs < s exact, so R sweeps
    are the sequential inverse; with a tolerance the iteration stops after the first sweep whose
    max abs change over the batch is <= it. A step costs about what a sequential step does where
    that one is bound by reading the weights (small batches): R tokens read them once.
    """
    z_BxNxD = self._order(z_BxNxD.astype(jnp.float32))
    x0_BxNxD = self._order(x0_BxNxD.astype(jnp.float32))
    b, n, _ = z_BxNxD.shape
    first = 0 if self.start_token else 1
    p = n - first
    seg = -(-p // max(1, min(segments, p)))
    runs = -(-p // seg)
    q = runs * seg
    pad = [(0, 0), (0, q - p), (0, 0)]
    zu_BxQxD = jnp.pad(z_BxNxD[:, first:], pad)
    u_BxQxD = jnp.pad(x0_BxNxD[:, first:], pad)
    pos_QxW = jnp.pad(self.pos[:p], [(0, q - p), (0, 0)])
    v0_BxD = z_BxNxD[:, 0]
    valid_Q = jnp.arange(q) < p
    cap = runs if max_sweeps <= 0 else min(max_sweeps, runs)

    def inputs(u_BxQxD):   # v_j = u_(j - 1); v_0 = z_0 (ignored with a start token)
      return jnp.concatenate([v0_BxD[:, None], u_BxQxD[:, :-1]], axis=1)

    # The start's full pass: keys and values of every position, and the first iterate.
    h_BxQxW = self._decode_inputs(inputs(u_BxQxD), jnp.arange(q), pos_QxW, labels_B)
    out_BxQxW, caches = self.transformer(h_BxQxW, self.transformer.init_cache(b, q), 0)
    u_BxQxD = jnp.where(valid_Q[None, :, None], self._emit(out_BxQxW, zu_BxQxD), 0.0)

    def step(block, carry, j):
      caches, u_BxQxD, change = carry
      positions_R = jnp.arange(runs) * seg + j
      h_BxRxW = block._decode_inputs(inputs(u_BxQxD)[:, positions_R], positions_R,
                                     pos_QxW[positions_R], labels_B)
      out_BxRxW, caches = block.transformer(h_BxRxW, caches, positions_R)
      x_BxRxD = block._emit(out_BxRxW, zu_BxQxD[:, positions_R])
      x_BxRxD = jnp.where(valid_Q[positions_R][None, :, None], x_BxRxD, 0.0)
      change = jnp.maximum(change, jnp.max(jnp.abs(x_BxRxD - u_BxQxD[:, positions_R])))
      return (caches, u_BxQxD.at[:, positions_R].set(x_BxRxD), change), None

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False}, in_axes=0)

    def sweep(block, state):
      k, caches, u_BxQxD, _ = state
      (caches, u_BxQxD, change), _ = scan(block, (caches, u_BxQxD, jnp.float32(0)),
                                          jnp.arange(seg))
      return k + 1, caches, u_BxQxD, change

    def going(block, state):
      k, _, _, change = state
      return (k < cap) & (change > tolerance)

    k, _, u_BxQxD, _ = nn.while_loop(going, sweep, self,
                                     (jnp.int32(0), caches, u_BxQxD, jnp.float32(jnp.inf)))
    x_BxNxD = u_BxQxD[:, :p]
    if not self.start_token:
      x_BxNxD = jnp.concatenate([z_BxNxD[:, :1], x_BxNxD], axis=1)
    return self._order(x_BxNxD), k

  def inverse_recompute(self, z_BxNxD: jax.Array, labels_B: jax.Array | None = None) -> jax.Array:
    """The same inverse recomputing the whole prefix at every token: O(N) full passes.

    The reference the KV-cached `inverse` is tested and benchmarked against.
    """
    z_BxNxD = self._order(z_BxNxD.astype(jnp.float32))

    def step(block, carry):
      i, x_BxNxD = carry
      mu_BxNxD, a_BxNxD = block.affine_params(x_BxNxD, labels_B)
      x_i = z_BxNxD[:, i] * jnp.exp(a_BxNxD[:, i]) + mu_BxNxD[:, i]
      return i + 1, x_BxNxD.at[:, i].set(x_i)

    _, x_BxNxD = nn.while_loop(lambda _, carry: carry[0] < self.num_tokens, step, self,
                               (jnp.int32(0), jnp.zeros_like(z_BxNxD)))
    return self._order(x_BxNxD)


class Flow(nn.Module):
  """F = f_n o ... o f_1 with alternating token-order flips (identity, flip, identity, ...)."""
  token_dim: int
  num_tokens: int
  num_blocks: int
  width: int
  depth: int
  head_dim: int = 64
  mlp_ratio: int = 4
  start_token: bool = True
  logscale_clip: float = 4.0
  num_classes: int = 0
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "einsum"
  causal: bool = True           # False: the one-step student (SPEC sec. 6), same parameter tree

  def setup(self):
    self.blocks = [
        AffineBlock(self.token_dim, self.num_tokens, self.width, self.depth, flip=block_flips(t),
                    head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
                    start_token=self.start_token, logscale_clip=self.logscale_clip,
                    num_classes=self.num_classes, dtype=self.dtype, scan_layers=self.scan_layers,
                    remat=self.remat, causal=self.causal, attention=self.attention,
                    name=f"block_{t}")
        for t in range(self.num_blocks)
    ]

  def __call__(self, x_BxNxD: jax.Array, labels_B: jax.Array | None = None):
    """x [B, N, D] -> (z [B, N, D], total logdet [B])."""
    z_BxNxD = x_BxNxD.astype(jnp.float32)
    logdet_B = jnp.zeros(x_BxNxD.shape[0], jnp.float32)
    for block in self.blocks:
      z_BxNxD, block_logdet_B = block(z_BxNxD, labels_B)
      logdet_B = logdet_B + block_logdet_B
    return z_BxNxD, logdet_B

  def forward_chain(self, x_BxNxD: jax.Array, labels_B: jax.Array | None = None) -> list[jax.Array]:
    """[Z^0 = x, Z^1, ..., Z^n]: the input and every block's output, each [B, N, D] (natural order)."""
    chain = [x_BxNxD.astype(jnp.float32)]
    for block in self.blocks:
      chain.append(block(chain[-1], labels_B)[0])
    return chain

  def student_chain(self, z_BxNxD: jax.Array,
                    labels_B: jax.Array | None = None) -> list[jax.Array]:
    """The student's reversed chain on its own outputs: [Z~^{n-1}, ..., Z~^0] from Z~^n = z,
    Z~^{t-1} = g_t(Z~^t) (one parallel pass per block), each [B, N, D]."""
    chain = [z_BxNxD.astype(jnp.float32)]
    for block in reversed(self.blocks):
      chain.append(block.student_inverse(chain[-1], labels_B))
    return chain[1:]

  def student_inverse(self, z_BxNxD: jax.Array,
                      labels_B: jax.Array | None = None) -> jax.Array:
    """z [B, N, D] -> x in n parallel passes (the distilled decode; for causal=False)."""
    return self.student_chain(z_BxNxD, labels_B)[-1]

  def inverse_parallel(self, z_BxNxD: jax.Array, labels_B: jax.Array | None,
                       spec: ParallelInverse,
                       student_guess: Callable[[int, jax.Array], jax.Array] | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """z [B, N, D] -> (x [B, N, D], passes per block int32 [n], block 0 first): every block by
    (Gauss-Seidel-)Jacobi, `spec`, in reverse order. `student_guess(t, z_t)` gives block t's start
    from its input when spec.init is "student" (the distilled student's block t)."""
    z_top_BxNxD = x_BxNxD = z_BxNxD.astype(jnp.float32)
    passes = [None] * self.num_blocks
    for t in reversed(range(self.num_blocks)):
      if spec.init == "student":
        if student_guess is None:
          raise ValueError("jacobi_init = 'student' needs the distilled student's guess")
        x0_BxNxD = student_guess(t, x_BxNxD)
      else:
        x0_BxNxD = z_top_BxNxD if spec.init == "z" else x_BxNxD
      solve = (self.blocks[t].inverse_strided if spec.method == "strided"
               else self.blocks[t].inverse_parallel)
      x_BxNxD, passes[t] = solve(x_BxNxD, labels_B, x0_BxNxD, spec.block_segments(t),
                                 spec.tolerance, spec.max_iterations)
    return x_BxNxD, jnp.stack(passes) if passes else jnp.zeros((0,), jnp.int32)

  def inverse(self, z_BxNxD: jax.Array, labels_B: jax.Array | None = None,
              recompute: bool = False) -> jax.Array:
    """z [B, N, D] -> x: the blocks' exact inverses in reverse order (KV-cached unless `recompute`)."""
    x_BxNxD = z_BxNxD.astype(jnp.float32)
    for block in reversed(self.blocks):
      invert = block.inverse_recompute if recompute else block.inverse
      x_BxNxD = invert(x_BxNxD, labels_B)
    return x_BxNxD
