"""Round float64 into the output dtype once, to nearest with ties to even; the largest value that stays finite.

    from loradem.merge.rounding import round_into, finite_limit
    stored = round_into(out_chunk, acc_float64)     # out_chunk: bfloat16, float16, float32 or float64

torch converts float64 to bfloat16 and float16 through float32: two roundings,
which differ from one when the float32 value lands exactly on a midpoint of
the narrow format (measured: about 1e-5 of the elements of a folded tensor;
tests/test_assemble.py builds values where torch alone is wrong and checks
`round_into` against exact rational rounding).
"""

from __future__ import annotations

import numpy as np
import torch

_F16_MIN_NORMAL = 2.0**-14


def round_into(out: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """out[...] = acc (float64) rounded once, to nearest with ties to even, in out's dtype; returns the
    values stored before the last narrowing (float32 for bfloat16/float16 outputs) for checks.

    torch converts float64 to bfloat16 / float16 through float32, and those two roundings differ
    from one when the float32 value lands exactly on a midpoint of the narrow format (about 1e-5
    of the elements). Then the float32 value is moved one float32 ulp towards the float64 one,
    off the midpoint and on the correct side, before the second rounding; otherwise the second
    rounding of the float32 value equals the direct rounding of the float64 one. (The bit tests
    run in numpy: torch's integer kernels are several times slower on a CPU.)
    """
    if out.dtype not in (torch.bfloat16, torch.float16):
        out.copy_(acc)  # float64 and float32: one rounding already
        return out
    r = acc.to(torch.float32)
    flat = r.reshape(-1).numpy()
    bits = flat.view(np.uint32)
    if out.dtype == torch.bfloat16:  # 16 float32 bits dropped, also for (float32 and bfloat16) subnormals
        mid = (bits & 0xFFFF) == 0x8000
    else:  # float16: 13 bits dropped in its normal range; below it the spacing is 2**-24
        mid = (bits & 0x1FFF) == 0x1000
        small = np.abs(flat) < _F16_MIN_NORMAL
        if small.any():
            mid = np.where(small, np.remainder(flat * np.float32(2.0**25), np.float32(2.0)) == 1.0, mid)
    if mid.any():  # a few per million elements: fixed in numpy, element by element
        where = np.flatnonzero(mid)
        x, v = acc.reshape(-1).numpy()[where], flat[where]
        toward = np.where(x > v, np.float32(np.inf), np.float32(-np.inf))
        flat[where] = np.where(x != v, np.nextafter(v, toward), v)
    out.copy_(r)
    return r


def finite_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to Inf in `dtype`: its max plus half an ulp at max (exact in float64)."""
    info = torch.finfo(dtype)
    top = info.max / (2 - info.eps)  # 2**emax: max = (2 - eps) * 2**emax, so the ulp at max is eps * 2**emax
    return info.max + info.eps * top / 2
