"""Exact accumulators and label-keyed reductions shared by the kernels (private).

Three pieces live here:

- a small open-addressing hash table on ``uint64`` keys (0 = empty slot), usable from Numba,
  that maps sparse label ids (up to ``2**64 - 1``) to dense indices or counts;
- 128-bit integer arithmetic on pairs of 64-bit words ``(hi, lo)``: the grey-level sums and
  sums of squares and the fixed-point surface areas are accumulated this way, so that they
  are exact whatever the chunking and can never overflow in practice;
- :func:`combine_frames`: merges label-keyed partial tables (one per chunk) by key with a
  per-column rule (checked int64 sum, min, max, or, 128-bit sum, Chan's merge of float
  means and squared deviations), and the finalisers that turn exact sums into floats.

Grey accumulators (same in every partial table)
-----------------------------------------------
Integer grey (8, 16 or 32 bit, signed or unsigned):

``grey_sum_hi`` int64, ``grey_sum_lo`` uint64
    The sum of the grey values as a signed 128-bit integer ``hi * 2**64 + lo``.
``grey_sq_hi`` uint64, ``grey_sq_lo`` uint64
    The sum of the squared grey values as an unsigned 128-bit integer.

Float grey (float16/32/64, accumulated in float64):

``grey_mean`` float64, ``grey_m2`` float64
    Mean and sum of squared deviations from the mean of the rows' voxels; merged with Chan's
    parallel formula. Inside a chunk the sums are taken about a per-key shift (the first grey
    value met), which avoids the cancellation of ``sum(g**2) - sum(g)**2 / n``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numba import njit

U64 = np.uint64
_MIX1 = U64(0xBF58476D1CE4E5B9)
_MIX2 = U64(0x94D049BB133111EB)

INT_GREY_COLUMNS = ("grey_sum_hi", "grey_sum_lo", "grey_sq_hi", "grey_sq_lo")
FLOAT_GREY_COLUMNS = ("grey_mean", "grey_m2")
_GREY_DTYPES = {
    "grey_sum_hi": np.int64,
    "grey_sum_lo": np.uint64,
    "grey_sq_hi": np.uint64,
    "grey_sq_lo": np.uint64,
    "grey_mean": np.float64,
    "grey_m2": np.float64,
}


# --------------------------------------------------------------------------------------
# input dtypes and tables
# --------------------------------------------------------------------------------------


def empty_frame(dtypes):
    """A zero-row DataFrame with the given ``{column: dtype}``."""
    return pd.DataFrame({c: np.zeros(0, dtype=d) for c, d in dtypes.items()})


def grey_kind_of(dtype):
    """``"int"`` (exact 128-bit sums) or ``"float"`` (float64 sums) for a grey dtype."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize <= 8:
        return "float"
    if dtype.kind in "iub" and dtype.itemsize <= 4:
        return "int"
    raise TypeError(
        f"grey dtype {dtype} is not supported by the exact accumulators: use an integer type of "
        "at most 32 bits or float16/32/64 (convert 64-bit integer grey to float64)"
    )


def as_unsigned(labels):
    """The label array as an unsigned integer view of the same width (no copy)."""
    dt = np.dtype(labels.dtype)
    if dt.kind == "u":
        return labels
    if dt.kind == "i":
        return labels.view(np.dtype(f"u{dt.itemsize}"))
    if dt.kind == "b":
        return labels.view(np.uint8)
    raise TypeError(f"labels must have an integer dtype, got {dt}")


def grey_array(grey):
    """Grey as an array Numba reads: bool viewed as uint8; float16 widened (exactly) to float32."""
    if grey.dtype == bool:
        return grey.view(np.uint8)
    if grey.dtype == np.float16:
        return grey.astype(np.float32)
    return grey


# --------------------------------------------------------------------------------------
# hash table on uint64 keys
# --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _mix(key):
    z = key ^ (key >> U64(31))
    z = z * _MIX1
    z = z ^ (z >> U64(29))
    z = z * _MIX2
    return z ^ (z >> U64(32))


@njit(cache=True, nogil=True)
def table_slot(keys, key):
    """Slot of ``key`` in ``keys`` (power-of-two size, 0 = empty): its slot or the empty one."""
    mask = U64(keys.size - 1)
    i = np.int64(_mix(key) & mask)
    m = np.int64(mask)
    while True:
        k = keys[i]
        if k == key or k == 0:
            return i
        i = (i + 1) & m


@njit(cache=True, nogil=True)
def _grow(keys, vals):
    new_keys = np.zeros(keys.size * 2, dtype=np.uint64)
    new_vals = np.zeros(keys.size * 2, dtype=np.int64)
    for i in range(keys.size):
        if keys[i] != 0:
            j = table_slot(new_keys, keys[i])
            new_keys[j] = keys[i]
            new_vals[j] = vals[i]
    return new_keys, new_vals


@njit(cache=True, nogil=True)
def table_add(keys, vals, n, key, inc):
    """Add ``inc`` to the value of ``key`` (inserted if new); grows the table at load 1/2.

    Returns ``(keys, vals, n)``: the (possibly reallocated) arrays and the number of keys.
    """
    if 2 * (n + 1) > keys.size:
        keys, vals = _grow(keys, vals)
    i = table_slot(keys, key)
    if keys[i] == 0:
        keys[i] = key
        vals[i] = inc
        return keys, vals, n + 1
    vals[i] += inc
    return keys, vals, n


@njit(cache=True, nogil=True)
def row_changes(values, keep, use_keep, out, last):
    """Write to ``out`` the nonzero values of a row that differ from the previous kept value.

    ``keep`` (bool row, used when ``use_keep``) selects the values looked at; ``last`` is the
    value before the row. Returns ``(m, last)``: how many were written and the last value
    looked at. Feeds a table from a row with few lookups and no table reallocation inside
    the inner loop.
    """
    m = 0
    for i in range(values.size):
        if use_keep and not keep[i]:
            continue
        v = U64(values[i])
        if v != last:
            if v != 0:
                out[m] = v
                m += 1
            last = v
    return m, last


@njit(cache=True, nogil=True)
def collect_keys(lab, keep, use_keep, keys, vals):
    """Insert the nonzero values of a 3D array (where ``keep``, if used) into the table."""
    n = np.int64(0)  # typed int64 from the start: no literal-typed extra compilation of table_add
    row = np.zeros(lab.shape[2], dtype=np.uint64)
    last = U64(0)
    for z in range(lab.shape[0]):
        for y in range(lab.shape[1]):
            krow = keep[z, y] if use_keep else keep[0, 0]
            m, last = row_changes(lab[z, y], krow, use_keep, row, last)
            for i in range(m):
                keys, vals, n = table_add(keys, vals, n, row[i], np.int64(0))
    return keys, vals


def new_table(capacity=1024):
    """An empty table: ``(keys uint64[c], vals int64[c])`` with ``c`` a power of two."""
    c = 1 << max(4, int(capacity - 1).bit_length())
    return np.zeros(c, dtype=np.uint64), np.zeros(c, dtype=np.int64)


@njit(cache=True, nogil=True)
def table_index(keys, vals, sorted_keys):
    """Set ``vals[slot(k)] = i`` for ``k = sorted_keys[i]`` (keys must already be present)."""
    for i in range(sorted_keys.size):
        vals[table_slot(keys, sorted_keys[i])] = i


@njit(cache=True, nogil=True)
def table_values(keys, vals, present_keys):
    """Values stored for ``present_keys`` (all present in the table), in that order."""
    out = np.empty(present_keys.size, dtype=np.int64)
    for i in range(present_keys.size):
        out[i] = vals[table_slot(keys, present_keys[i])]
    return out


def table_keys(keys):
    """The keys present in a table, sorted ascending (uint64)."""
    return np.sort(keys[keys != 0])


def index_table(sorted_keys):
    """A table mapping each of ``sorted_keys`` (unique, nonzero) to its position."""
    keys, vals = new_table(2 * sorted_keys.size + 2)
    _fill_index(keys, vals, sorted_keys)
    return keys, vals


@njit(cache=True, nogil=True)
def _fill_index(keys, vals, sorted_keys):
    for i in range(sorted_keys.size):
        j = table_slot(keys, sorted_keys[i])
        keys[j] = sorted_keys[i]
        vals[j] = i


@njit(cache=True, nogil=True)
def lookup(keys, vals, key):
    """Dense index of ``key``; -1 when absent."""
    i = table_slot(keys, key)
    if keys[i] == 0:
        return np.int64(-1)
    return vals[i]


# --------------------------------------------------------------------------------------
# 128-bit integers as (hi, lo) words
# --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def add_u128(hi, lo, v):
    """``(hi, lo) + v`` for unsigned ``hi``, ``lo``, ``v`` (uint64 words)."""
    lo2 = lo + v
    if lo2 < lo:
        hi = hi + U64(1)
    return hi, lo2


@njit(cache=True, nogil=True)
def add_i128(hi, lo, v):
    """``(hi, lo) + v`` for a signed 128-bit ``(hi int64, lo uint64)`` and ``v`` int64."""
    lo2 = lo + U64(v)
    if lo2 < lo:
        hi = hi + np.int64(1)
    if v < 0:
        hi = hi - np.int64(1)
    return hi, lo2


@njit(cache=True, nogil=True)
def add_grey(s_hi, s_lo, q_hi, q_lo, g):
    """Add an integer grey value ``g`` (int64, |g| < 2**32) to the 128-bit sum and square sum."""
    s_hi, s_lo = add_i128(s_hi, s_lo, g)
    a = U64(g) if g >= 0 else U64(-g)
    q_hi, q_lo = add_u128(q_hi, q_lo, a * a)
    return s_hi, s_lo, q_hi, q_lo


def shifted_to_mean_m2(count, shifted):
    """Float grey ``(shift, sum(g - shift), sum((g - shift)**2))`` rows to ``(mean, m2)``.

    Parameters
    ----------
    count : ndarray of int64, shape (n,)
    shifted : ndarray of float64, shape (n, 3)

    Returns
    -------
    mean, m2 : ndarray of float64, shape (n,)
        0 where ``count == 0``; ``m2`` (sum of squared deviations) clipped at 0.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        shift_mean = np.where(count > 0, shifted[:, 1] / count, 0.0)
    mean = np.where(count > 0, shifted[:, 0] + shift_mean, 0.0)
    return mean, np.maximum(shifted[:, 2] - shifted[:, 1] * shift_mean, 0.0)


def words_to_int(hi, lo):
    """Exact Python integers ``hi * 2**64 + lo`` as an object array."""
    return hi.astype(object) * (1 << 64) + lo.astype(object)


# --------------------------------------------------------------------------------------
# segmented reductions on rows sorted by key
# --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _seg_sum_i64(a, starts):
    out = np.zeros(starts.size, dtype=np.int64)
    bad = False
    for g in range(starts.size):
        stop = starts[g + 1] if g + 1 < starts.size else a.size
        s = np.int64(0)
        for i in range(starts[g], stop):
            r = s + a[i]
            if ((s ^ r) & (a[i] ^ r)) < 0:
                bad = True
            s = r
        out[g] = s
    return out, bad


@njit(cache=True, nogil=True)
def _seg_sum_i128(hi, lo, starts):
    """Sums of 128-bit ``(hi int64, lo uint64)`` words per segment.

    Also sums unsigned words (``hi`` viewed as int64): two's complement addition is the
    same bit operation.
    """
    out_hi = np.zeros(starts.size, dtype=np.int64)
    out_lo = np.zeros(starts.size, dtype=np.uint64)
    for g in range(starts.size):
        stop = starts[g + 1] if g + 1 < starts.size else hi.size
        h = np.int64(0)
        low = U64(0)
        for i in range(starts[g], stop):
            low2 = low + lo[i]
            if low2 < low:
                h += 1
            low = low2
            h += hi[i]
        out_hi[g] = h
        out_lo[g] = low
    return out_hi, out_lo


@njit(cache=True, nogil=True)
def _seg_chan(count, mean, m2, starts):
    out_mean = np.zeros(starts.size, dtype=np.float64)
    out_m2 = np.zeros(starts.size, dtype=np.float64)
    for g in range(starts.size):
        stop = starts[g + 1] if g + 1 < starts.size else count.size
        n = 0.0
        mu = 0.0
        s2 = 0.0
        for i in range(starts[g], stop):
            nb = float(count[i])
            if nb == 0.0:
                continue
            tot = n + nb
            delta = mean[i] - mu
            mu = mu + delta * (nb / tot)
            s2 = s2 + m2[i] + delta * delta * (n * nb / tot)
            n = tot
        out_mean[g] = mu
        out_m2[g] = s2
    return out_mean, out_m2


def grey_kind(columns):
    """``"int"`` or ``"float"``: which grey accumulators a partial table carries."""
    if "grey_sum_lo" in columns:
        return "int"
    if "grey_mean" in columns:
        return "float"
    raise ValueError("partial table has no grey accumulators (grey_sum_* or grey_mean)")


def grey_columns(kind):
    """Names of the grey accumulator columns for ``kind`` (``"int"`` or ``"float"``)."""
    return INT_GREY_COLUMNS if kind == "int" else FLOAT_GREY_COLUMNS


def grey_dtypes(kind):
    """``{column: dtype}`` of the grey accumulator columns for ``kind``."""
    return {c: _GREY_DTYPES[c] for c in grey_columns(kind)}


def combine_frames(frames, key_columns, rules, what):
    """Merge label-keyed partial tables by key, exactly.

    Parameters
    ----------
    frames : sequence of pandas.DataFrame
        Partial tables with identical columns; any row order, keys may repeat.
    key_columns : sequence of str
        Columns forming the key (e.g. ``["label"]``); the output is sorted by them.
    rules : dict of str to str
        ``column -> rule`` for every non-key column: ``"sum"`` (int64, overflow raises),
        ``"min"``, ``"max"``, ``"any"``, ``"u128"`` / ``"i128"`` (give the ``*_hi`` column;
        its ``*_lo`` partner is implied), ``"chan"`` (give the ``*_mean`` column; the
        ``*_m2`` partner and the ``count`` column are used), ``"implied"`` for partners.
    what : str
        Name used in error messages.

    Returns
    -------
    pandas.DataFrame
        One row per distinct key, same columns and dtypes as the inputs.
    """
    frames = [f for f in frames if f is not None]
    if not frames:
        raise ValueError(f"combine {what}: no partial tables given")
    columns = list(frames[0].columns)
    for f in frames[1:]:
        if list(f.columns) != columns:
            raise ValueError(
                f"combine {what}: partial tables have different columns "
                f"({columns} vs {list(f.columns)}); were they made with the same grey dtype kind?"
            )
    if len(frames) == 1:  # no copy: the arrays are only read
        data = {c: frames[0][c].to_numpy() for c in columns}
    else:
        data = {c: np.concatenate([f[c].to_numpy() for f in frames]) for c in columns}
    if data[key_columns[0]].size == 0:
        return frames[0].iloc[:0].copy()
    if not (len(frames) == 1 and _keys_sorted([data[k] for k in key_columns])):
        order = np.lexsort([data[k] for k in reversed(key_columns)])
        data = {c: v[order] for c, v in data.items()}
    change = np.zeros(data[key_columns[0]].size, dtype=bool)
    change[0] = True
    for k in key_columns:
        change[1:] |= data[k][1:] != data[k][:-1]
    starts = np.flatnonzero(change)
    out = {k: data[k][starts] for k in key_columns}
    for col, rule in rules.items():
        a = data[col]
        if rule == "sum":
            out[col], bad = _seg_sum_i64(a.astype(np.int64, copy=False), starts)
            if bad:
                raise OverflowError(f"combine {what}: int64 overflow in column {col!r}")
        elif rule == "min":
            out[col] = np.minimum.reduceat(a, starts)
        elif rule == "max":
            out[col] = np.maximum.reduceat(a, starts)
        elif rule == "any":
            out[col] = np.logical_or.reduceat(a, starts)
        elif rule in ("u128", "i128"):
            lo_col = col[: -len("_hi")] + "_lo"
            hi, out[lo_col] = _seg_sum_i128(a.view(np.int64), data[lo_col], starts)
            out[col] = hi.view(a.dtype)
        elif rule == "chan":
            m2_col = col[: -len("_mean")] + "_m2"
            out[col], out[m2_col] = _seg_chan(data["count"], a, data[m2_col], starts)
        elif rule != "implied":
            raise ValueError(f"unknown combine rule {rule!r}")
    return pd.DataFrame({c: out[c] for c in columns})


def _keys_sorted(keys) -> bool:
    """Whether rows are in lexicographic order of the key arrays `keys` (ties allowed), as a
    single frame already combined (or the ROI's selection of one) is."""
    n = keys[0].size
    undecided = np.ones(max(n - 1, 0), dtype=bool)  # pairs (i, i + 1) equal on the keys so far
    for k in keys:
        a, b = k[:-1], k[1:]
        if (undecided & (a > b)).any():
            return False
        undecided &= a == b
    return True


def grey_rules(kind):
    """Combine rules of the grey accumulator columns (see :func:`combine_frames`)."""
    if kind == "int":
        return {
            "grey_sum_hi": "i128",
            "grey_sum_lo": "implied",
            "grey_sq_hi": "u128",
            "grey_sq_lo": "implied",
        }
    return {"grey_mean": "chan", "grey_m2": "implied"}


def exact_ratio(num, den):
    """Correctly rounded float64 of ``num / den`` for object arrays of Python integers."""
    if num.size == 0:
        return np.zeros(0, dtype=np.float64)
    return np.array([a / b for a, b in zip(num.tolist(), den.tolist())], dtype=np.float64)


_EXACT_F64 = 1 << 53  # integers up to this magnitude are exact in float64


def ratio_i64(num, den):
    """Correctly rounded float64 of ``num / den`` for int64 arrays (``den > 0``).

    Where ``|num|`` and ``den`` are at most 2**53 both are exact in float64 and one IEEE
    division rounds correctly, giving the bits of Python's ``int / int``; other rows take that
    Python route.
    """
    num = np.asarray(num, np.int64)
    den = np.asarray(den, np.int64)
    out = np.empty(num.shape, np.float64)
    fast = (np.abs(num) <= _EXACT_F64) & (den > 0) & (den <= _EXACT_F64)
    out[fast] = num[fast].astype(np.float64) / den[fast].astype(np.float64)
    if not fast.all():
        out[~fast] = exact_ratio(num[~fast].astype(object), den[~fast].astype(object))
    return out


def covariance_ratio(n, s_ab, s_a, s_b):
    """Correctly rounded float64 of ``(n s_ab - s_a s_b) / n**2`` for int64 arrays.

    The numerator is formed in int64 where both products surely fit (their float64 estimate
    below 2**61), else with Python integers; then :func:`ratio_i64` or :func:`exact_ratio`.
    """
    n, s_ab, s_a, s_b = (np.asarray(v, np.int64) for v in (n, s_ab, s_a, s_b))
    nf = n.astype(np.float64)
    safe = ((np.abs(nf * s_ab.astype(np.float64)) < 2.0**61)
            & (np.abs(s_a.astype(np.float64) * s_b.astype(np.float64)) < 2.0**61) & (n < (1 << 31)))
    out = np.empty(n.shape, np.float64)
    if safe.any():
        out[safe] = ratio_i64(n[safe] * s_ab[safe] - s_a[safe] * s_b[safe], n[safe] * n[safe])
    if not safe.all():
        no, ab = n[~safe].astype(object), s_ab[~safe].astype(object)
        a, b = s_a[~safe].astype(object), s_b[~safe].astype(object)
        out[~safe] = exact_ratio(no * ab - a * b, no * no)
    return out


def grey_mean_std(frame):
    """Mean and population standard deviation (ddof 0) of grey per row.

    Parameters
    ----------
    frame : pandas.DataFrame
        A combined table with ``count`` (> 0) and the grey accumulator columns.

    Returns
    -------
    mean, std : ndarray of float64, shape (n_rows,)
        For integer grey both are the correctly rounded values of the exact rationals
        ``S / n`` and ``sqrt((n Q - S**2) / n**2)`` (the square root rounded once more), so
        they depend only on the exact integer sums: bitwise reproducible across chunkings.
    """
    n = frame["count"].to_numpy()
    if grey_kind(frame.columns) == "float":
        mean = frame["grey_mean"].to_numpy().astype(np.float64)
        m2 = np.maximum(frame["grey_m2"].to_numpy(), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return mean, np.sqrt(m2 / n)
    s_hi, s_lo = frame["grey_sum_hi"].to_numpy(), frame["grey_sum_lo"].to_numpy()
    q_hi, q_lo = frame["grey_sq_hi"].to_numpy(), frame["grey_sq_lo"].to_numpy()
    mean = np.empty(len(n), np.float64)
    var = np.empty(len(n), np.float64)
    # Fast rows: S, n Q - S**2 and n**2 are integers below 2**53, so float64 holds them exactly and
    # one IEEE division rounds correctly, as Python's int / int does: the same bits, no Python ints.
    n64 = n.astype(np.int64)
    fast = (s_hi == 0) & (q_hi == 0) & (s_lo.astype(np.uint64) < np.uint64(1 << 31)) & (n64 > 0) & (n64 < (1 << 26))
    fast[fast] &= q_lo[fast].astype(np.uint64) <= ((1 << 53) // n64[fast]).astype(np.uint64)
    if fast.any():
        nf, sf, qf = n64[fast], s_lo[fast].astype(np.int64), q_lo[fast].astype(np.int64)
        mean[fast] = sf.astype(np.float64) / nf.astype(np.float64)
        var[fast] = (nf * qf - sf * sf).astype(np.float64) / (nf * nf).astype(np.float64)
    slow = ~fast
    if slow.any():
        s = words_to_int(s_hi[slow], s_lo[slow])
        q = words_to_int(q_hi[slow], q_lo[slow])
        n_obj = n[slow].astype(object)
        mean[slow] = exact_ratio(s, n_obj)
        var[slow] = exact_ratio(n_obj * q - s * s, n_obj * n_obj)
    return mean, np.sqrt(var)
