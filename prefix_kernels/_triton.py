"""The Triton kernel bodies (``@triton.jit``) of the prefix attention, and the import fallback.

Nothing here is launched directly: the launchers in ``_launch.py`` (prefill/decode),
``cascade.py`` (the cascade's prefix part) and ``prefix_attention.py`` (``write_kv``) pick the
grid and constexprs and look these bodies up as attributes of this module at launch time, so
re-importing this one module (``importlib.reload``) is enough to switch TRITON_INTERPRET.
Each kernel's PyTorch reference is in ``reference.py``: ``_prefix_attention_fwd``,
``_prefix_attention_decode`` and ``_shared_prefix_fwd`` + ``_prefix_attention_*`` (the cascade)
against ``prefix_attention_ref``; ``_write_kv`` against ``write_kv_ref``.

Shapes (letters as in the package docstring): q [B, H, Lq, D]; the row's own k/v [B, Hkv, Lk, D];
the prefix cache of one layer [N, Hkv, Pmax, D] with prefix_lens [N] and prompt_idx [B].
Scores are kept in log2 units (``qk_scale`` = softmax scale * log2(e)) so exp2 is exact; every
base offset is int64 (caches and batches can pass 2**31 elements).

The kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this
module was imported (the tests do that). Without Triton the module still imports (the bodies
are plain functions that are never launched) and ``TRITON_IMPORT_ERROR`` says why.
"""

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as _err:  # CPU-only install: the references work, the kernels raise when called

    class _NoTriton:
        """Stand-in so the @triton.jit definitions below can be defined; they are never launched."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()
    TRITON_IMPORT_ERROR = _err


@triton.jit
def _attend_range(
    acc, m_i, l_i,  # running state: [BLOCK_M, BLOCK_D] f32, [BLOCK_M] f32 (log2 units), [BLOCK_M] f32
    q,  # [BLOCK_M, BLOCK_D] query tile, stays in registers/SRAM for every key block
    k_base, v_base,  # pointers to key 0 of one (prompt | row, kv head): keys are [n, D] at these strides
    stride_kn, stride_kd, stride_vn, stride_vd,
    start, end,  # key range [start, end)
    q_pos,  # [BLOCK_M] own position of each query row (used when CAUSAL)
    qk_scale,  # softmax scale * log2(e): scores are kept in log2 units so exp2 is exact
    offs_d, d_ok,  # [BLOCK_D] head-dim offsets and their mask (D may be padded to a power of 2)
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax pass of a query tile over keys [start, end) (flash-attention v2 inner loop)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        kn = n0 + offs_n  # [BLOCK_N]
        k_ok = kn < end
        kn64 = kn.to(tl.int64)  # key offsets in int64: a long per-row buffer can pass 2**31 elements
        kt = tl.load(k_base + kn64[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] f32
        if CAUSAL:
            visible = k_ok[None, :] & (kn[None, :] <= q_pos[:, None])
        else:
            visible = k_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
        # exp2 gives 0 (not NaN) and the state stays exactly (m=-inf, l=0, acc=0)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _lse_log2(m_i, l_i):
    """log2 of the softmax denominator, -inf (not NaN, no log of 0) for rows that saw no key."""
    return tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))


@triton.jit
def _start_state(
    q, q_pos, tile_ok,  # [R, BLOCK_D] query tile, [R] own positions, [R] rows that exist
    b, kvh,  # row and kv head of this program
    o_off, lse_off,  # [R, BLOCK_D] / [R] offsets into the cascade's partial output / lse
    part_o_ptr, part_lse_ptr,  # cascade partial result (PREFIX_FROM_PARTIAL)
    pk_ptr, pv_ptr, prefix_lens_ptr, prompt_idx_ptr,  # prefix cache [N, Hkv, Pmax, D], [N], [B]
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    qk_scale, offs_d, d_ok,
    R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PREFIX_FROM_PARTIAL: tl.constexpr,
):
    """Online-softmax state (acc, m, l) after the row's prefix: read from the cascade's
    partial result, or computed here over the prompt's cached prefix (visible to every query,
    no causal mask)."""
    if PREFIX_FROM_PARTIAL:
        # (m = lse, l = 1, acc = normalised output) is the online-softmax state after the prefix
        acc = tl.load(part_o_ptr + o_off, mask=tile_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.load(part_lse_ptr + lse_off, mask=tile_ok, other=float("-inf"))
        l_i = tl.full([R], 1.0, tl.float32)
    else:
        acc = tl.zeros([R, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], dtype=tl.float32)
        p64 = tl.load(prompt_idx_ptr + b).to(tl.int64)
        plen = tl.load(prefix_lens_ptr + p64).to(tl.int32)
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q,
            pk_ptr + p64 * stride_pkn + kvh.to(tl.int64) * stride_pkh,
            pv_ptr + p64 * stride_pvn + kvh.to(tl.int64) * stride_pvh,
            stride_pkp, stride_pkd, stride_pvp, stride_pvd,
            0, plen, q_pos, qk_scale, offs_d, d_ok, False, BLOCK_N, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _prefix_attention_fwd(
    q_ptr,  # [B, H, Lq, D]
    k_ptr,  # [B, Hkv, Lk, D] the row's own keys
    v_ptr,  # [B, Hkv, Lk, D]
    pk_ptr,  # [N, Hkv, Pmax, D] prefix keys, shared by all rows of a prompt
    pv_ptr,  # [N, Hkv, Pmax, D]
    prefix_lens_ptr,  # [N] int
    prompt_idx_ptr,  # [B] int
    kv_lens_ptr,  # [B] int, or None (HAS_KV_LENS=False: Lk)
    q_lens_ptr,  # [B] int, or None (HAS_Q_LENS=False: Lq)
    o_ptr,  # [B, H, Lq, D] out, q's dtype
    lse_ptr,  # [B, H, Lq] f32 out (STORE_LSE), contiguous
    part_o_ptr,  # [B, H, Lq, D] f32, o's strides: normalised prefix part (PREFIX_FROM_PARTIAL)
    part_lse_ptr,  # [B, H, Lq] f32, contiguous: its log2-sum-exp (PREFIX_FROM_PARTIAL)
    qk_scale, H, Lq, Lk,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_om, stride_od,
    GROUP: tl.constexpr,  # H // Hkv query heads per key/value head
    BLOCK_Q: tl.constexpr,  # queries per program; BLOCK_Q * GROUP <= BLOCK_M
    BLOCK_M: tl.constexpr,  # tile rows = (query, head-in-group) pairs
    BLOCK_N: tl.constexpr,  # keys per inner step
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2 (>= 16 for tl.dot)
    HAS_KV_LENS: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    PREFIX_FROM_PARTIAL: tl.constexpr,  # cascade: start from the prefix part instead of reading the prefix
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding), else "tf32" (ignored)
):
    """Prefill: one program = BLOCK_Q queries x the GROUP query heads of one kv head of one row.

    Packing the GROUP heads into the tile rows means each K/V block (prefix and own) is loaded
    once per kv head and reused by all its query heads, as in vLLM's unified attention.
    Reference: ``reference.prefix_attention_ref`` (Lq > 1).
    """
    tl.static_assert(BLOCK_Q * GROUP <= BLOCK_M)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_D >= 16 and BLOCK_D <= 256)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)  # tl.dot needs 16 x 16 tiles
    pid_q = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)  # every base offset in int64: caches and batches can pass 2**31 elements

    if HAS_Q_LENS:
        q_len = tl.load(q_lens_ptr + b).to(tl.int32)
    else:
        q_len = Lq
    if HAS_KV_LENS:
        kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    else:
        kv_len = Lk

    offs_r = tl.arange(0, BLOCK_M)
    qi = pid_q * BLOCK_Q + offs_r // GROUP  # [BLOCK_M] query index of each tile row
    h = kvh * GROUP + offs_r % GROUP  # [BLOCK_M] query head of each tile row
    row_in = (offs_r < BLOCK_Q * GROUP) & (qi < Lq)  # tile rows that exist in `out`
    row_ok = row_in & (qi < q_len)  # tile rows that are real queries
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qi64 = qi.to(tl.int64)
    h64 = h.to(tl.int64)
    o_off = (b64 * stride_ob + h64[:, None] * stride_oh + qi64[:, None] * stride_om
             + offs_d[None, :] * stride_od)
    lse_off = (b64 * H + h64) * Lq + qi64  # [BLOCK_M] into contiguous [B, H, Lq]

    if pid_q * BLOCK_Q >= q_len:
        # padding queries of a short row: write zeros and skip all attention work
        tl.store(o_ptr + o_off, tl.zeros([BLOCK_M, BLOCK_D], dtype=o_ptr.dtype.element_ty),
                 mask=row_in[:, None] & d_ok[None, :])
        if STORE_LSE:
            tl.store(lse_ptr + lse_off, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=row_in)
        return

    q_pos = kv_len - q_len + qi  # [BLOCK_M] own position of each query (decode/chunked: after the cache)
    q = tl.load(q_ptr + b64 * stride_qb + h64[:, None] * stride_qh + qi64[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # q stays in SRAM for the whole loop: prefix blocks first, then own blocks

    acc, m_i, l_i = _start_state(
        q, q_pos, row_ok, b, kvh, o_off, lse_off, part_o_ptr, part_lse_ptr,
        pk_ptr, pv_ptr, prefix_lens_ptr, prompt_idx_ptr,
        stride_pkn, stride_pkh, stride_pkp, stride_pkd, stride_pvn, stride_pvh, stride_pvp, stride_pvd,
        qk_scale, offs_d, d_ok, BLOCK_M, BLOCK_D, BLOCK_N, DOT_PRECISION, PREFIX_FROM_PARTIAL)

    k_base = k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    first_pos = kv_len - q_len + pid_q * BLOCK_Q  # own position of the block's first query
    last_end = tl.minimum(first_pos + BLOCK_Q, kv_len)  # one past the block's last query position
    # own keys [0, first_pos] are visible to every query of the block: no causal mask
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        0, first_pos + 1, q_pos, qk_scale, offs_d, d_ok, False, BLOCK_N, DOT_PRECISION)
    # the diagonal band (first_pos, last_end): causal mask
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        first_pos + 1, last_end, q_pos, qk_scale, offs_d, d_ok, True, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = _lse_log2(m_i, l_i) * 0.6931471805599453  # log2 units -> natural log
        tl.store(lse_ptr + lse_off, tl.where(row_ok, lse, float("-inf")), mask=row_in)


@triton.jit
def _prefix_attention_decode(
    q_ptr,  # [B, H, 1, D]
    k_ptr,  # [B, Hkv, Lk, D] per-row buffers, valid up to kv_lens[b] (current token included)
    v_ptr,  # [B, Hkv, Lk, D]
    pk_ptr,  # [N, Hkv, Pmax, D]
    pv_ptr,  # [N, Hkv, Pmax, D]
    prefix_lens_ptr,  # [N] int
    prompt_idx_ptr,  # [B] int
    kv_lens_ptr,  # [B] int, or None (Lk)
    q_lens_ptr,  # [B] int (0: idle row, 1: active), or None (all active)
    o_ptr,  # [B, H, 1, D]
    lse_ptr,  # [B, H, 1] f32, contiguous (STORE_LSE)
    part_o_ptr,  # [B, H, 1, D] f32, o's strides (PREFIX_FROM_PARTIAL)
    part_lse_ptr,  # [B, H, 1] f32, contiguous
    qk_scale, H, Lk,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP rounded up to a power of 2, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_KV_LENS: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    PREFIX_FROM_PARTIAL: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Decode (one new query per row): one program = the GROUP query heads of one kv head of one row.

    The tile rows are the query heads, so every prefix/own K/V block is read once per kv head;
    the single query sits at the end of the row, so no causal mask is needed.
    Reference: ``reference.prefix_attention_ref`` (Lq == 1).
    """
    tl.static_assert(BLOCK_G >= GROUP)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_D >= 16 and BLOCK_D <= 256)
    tl.static_assert(BLOCK_G >= 16 and BLOCK_N >= 16)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    b64 = b.to(tl.int64)
    if HAS_Q_LENS:
        q_len = tl.load(q_lens_ptr + b).to(tl.int32)
    else:
        q_len = 1
    if HAS_KV_LENS:
        kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    else:
        kv_len = Lk

    offs_g = tl.arange(0, BLOCK_G)
    h64 = (kvh * GROUP + offs_g).to(tl.int64)
    g_ok = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    o_off = b64 * stride_ob + h64[:, None] * stride_oh + offs_d[None, :] * stride_od
    lse_off = b64 * H + h64

    if q_len == 0:
        # idle row in a ragged decode batch
        tl.store(o_ptr + o_off, tl.zeros([BLOCK_G, BLOCK_D], dtype=o_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
        if STORE_LSE:
            tl.store(lse_ptr + lse_off, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=g_ok)
        return

    q = tl.load(q_ptr + b64 * stride_qb + h64[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D], stays in SRAM
    q_pos = tl.full([BLOCK_G], 0, tl.int32) + (kv_len - 1)
    acc, m_i, l_i = _start_state(
        q, q_pos, g_ok, b, kvh, o_off, lse_off, part_o_ptr, part_lse_ptr,
        pk_ptr, pv_ptr, prefix_lens_ptr, prompt_idx_ptr,
        stride_pkn, stride_pkh, stride_pkp, stride_pkd, stride_pvn, stride_pvh, stride_pvp, stride_pvd,
        qk_scale, offs_d, d_ok, BLOCK_G, BLOCK_D, BLOCK_N, DOT_PRECISION, PREFIX_FROM_PARTIAL)
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q,
        k_ptr + b64 * stride_kb + kvh.to(tl.int64) * stride_kh,
        v_ptr + b64 * stride_vb + kvh.to(tl.int64) * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        0, kv_len, q_pos, qk_scale, offs_d, d_ok, False, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        tl.store(lse_ptr + lse_off, _lse_log2(m_i, l_i) * 0.6931471805599453, mask=g_ok)


@triton.jit
def _shared_prefix_fwd(
    q_ptr,  # [B, H, Lq, D]
    pk_ptr,  # [N, Hkv, Pmax, D]
    pv_ptr,  # [N, Hkv, Pmax, D]
    prefix_lens_ptr,  # [N] int
    q_lens_ptr,  # [B] int, or None (Lq)
    rows_ptr,  # [B] int64: row ids sorted by prompt (rows of prompt n are rows[seg_start[n]:][:seg_count[n]])
    seg_start_ptr,  # [N] int64
    seg_count_ptr,  # [N] int64
    block_start_ptr,  # [N + 1] int64: first program of each prompt; block_start[N] = programs in use
    part_o_ptr,  # [B, H, Lq, D] f32 out: prefix-only attention, normalised
    part_lse_ptr,  # [B, H, Lq] f32 out, contiguous: log2-sum-exp of the prefix scores
    qk_scale, H, Lq, N,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_om, stride_od,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # stacked (row, query, head-in-group) triples per program
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_Q_LENS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Cascade, prefix part: the queries of ALL rows of one prompt are stacked into the tile rows,
    so one K/V block of that prompt's prefix serves BLOCK_M (row, query, head) triples at once
    (Hydragen's inter-sequence batching): the prefix is read once per BLOCK_M stacked queries
    instead of once per row, and the dots have full-height tiles even in decode.
    Reference: ``reference.prefix_attention_ref`` (followed by the own part, ``cascade.py``).
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_D >= 16 and BLOCK_D <= 256)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    if pid >= tl.load(block_start_ptr + N):
        return  # the grid is an upper bound so that planning needs no device sync
    # binary search for the prompt n with block_start[n] <= pid < block_start[n + 1]
    lo = pid * 0  # int32 tensors (not constants) so the loop may reassign them
    hi = lo + N
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(block_start_ptr + mid) <= pid:
            lo = mid
        else:
            hi = mid
    n64 = lo.to(tl.int64)

    per_row = Lq * GROUP
    s = (pid - tl.load(block_start_ptr + n64)) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] stacked index
    s_ok = s < tl.load(seg_count_ptr + n64) * per_row
    b64 = tl.load(rows_ptr + tl.load(seg_start_ptr + n64) + s // per_row, mask=s_ok, other=0).to(tl.int64)
    qi = (s // GROUP) % Lq
    h64 = (kvh * GROUP + s % GROUP).to(tl.int64)
    if HAS_Q_LENS:
        q_len = tl.load(q_lens_ptr + b64, mask=s_ok, other=0).to(tl.int32)
    else:
        q_len = Lq
    ok = s_ok & (qi < q_len)
    qi64 = qi.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b64[:, None] * stride_qb + h64[:, None] * stride_qh + qi64[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=ok[:, None] & d_ok[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    plen = tl.load(prefix_lens_ptr + n64).to(tl.int32)
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q,
        pk_ptr + n64 * stride_pkn + kvh.to(tl.int64) * stride_pkh,
        pv_ptr + n64 * stride_pvn + kvh.to(tl.int64) * stride_pvh,
        stride_pkp, stride_pkd, stride_pvp, stride_pvd,
        0, plen, qi, qk_scale, offs_d, d_ok, False, BLOCK_N, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_off = (b64[:, None] * stride_ob + h64[:, None] * stride_oh + qi64[:, None] * stride_om
             + offs_d[None, :] * stride_od)
    tl.store(part_o_ptr + o_off, out, mask=ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + (b64 * H + h64) * Lq + qi64, _lse_log2(m_i, l_i), mask=ok)


@triton.jit
def _write_kv(
    kc_ptr,  # [B, Hkv, cap, D]
    vc_ptr,  # [B, Hkv, cap, D]
    kn_ptr,  # [B, Hkv, 1, D]
    vn_ptr,  # [B, Hkv, 1, D]
    pos_ptr,  # [B] int: slot to write; outside [0, cap) means "skip this row"
    Hkv, cap,
    stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd,
    stride_knb, stride_knh, stride_knd,
    stride_vnb, stride_vnh, stride_vnd,
    BLOCK_H: tl.constexpr,  # Hkv rounded up to a power of 2
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per row: copy the row's [Hkv, D] new key and value into slot positions[b].
    Reference: ``reference.write_kv_ref``."""
    b64 = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + b64).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h[:, None] < Hkv) & (offs_d[None, :] < HEAD_DIM)
    if (pos >= 0) & (pos < cap):  # rows parked at position -1 (idle) write nothing
        k = tl.load(kn_ptr + b64 * stride_knb + offs_h[:, None] * stride_knh + offs_d[None, :] * stride_knd,
                    mask=ok)
        v = tl.load(vn_ptr + b64 * stride_vnb + offs_h[:, None] * stride_vnh + offs_d[None, :] * stride_vnd,
                    mask=ok)
        tl.store(kc_ptr + b64 * stride_kcb + offs_h[:, None] * stride_kch + pos * stride_kcn
                 + offs_d[None, :] * stride_kcd, k, mask=ok)
        tl.store(vc_ptr + b64 * stride_vcb + offs_h[:, None] * stride_vch + pos * stride_vcn
                 + offs_d[None, :] * stride_vcd, v, mask=ok)
