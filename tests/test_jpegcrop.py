"""vggdist._jpegcrop (C): damaged input never crashes the process, and repeated calls do not leak.

Its pixel exactness against a full decode, the declines and the thread test are in test_jpeg.py; the
preprocessing paths that use it in test_preprocess_images.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vggdist import jpeg

pytestmark = pytest.mark.skipif(jpeg._jpegcrop is None, reason="vggdist._jpegcrop was not built")

# runs in a child process: a crash (segfault, abort) shows up as a return code instead of killing pytest
FUZZ = textwrap.dedent(
    """
    import io, resource, sys
    import numpy as np
    from PIL import Image
    from vggdist import _jpegcrop

    rng = np.random.default_rng(int(sys.argv[1]))

    def jpeg(w, h, **kw):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85, **kw)
        return buf.getvalue()

    bases = [jpeg(120, 90), jpeg(90, 120, progressive=True), jpeg(64, 64, subsampling=0)]
    decoded = refused = 0
    for it in range(int(sys.argv[2])):
        d = bytearray(bases[it % 3])
        mode = it % 4
        if mode == 0:  # flipped bytes
            for _ in range(rng.integers(1, 20)):
                d[rng.integers(0, len(d))] = rng.integers(0, 256)
        elif mode == 1:  # truncated anywhere, headers included
            d = d[: rng.integers(0, len(d))]
        elif mode == 2:  # garbage inserted
            i = rng.integers(2, len(d))
            d = d[:i] + bytes(rng.integers(0, 256, rng.integers(1, 200), dtype=np.uint8)) + d[i:]
        else:  # a broken marker in the headers
            p = rng.integers(2, 200)
            d[p : p + 4] = b"\\xff\\xc0\\xff\\xff"
        d = bytes(d)
        try:
            _jpegcrop.header(d)
            x0, y0 = rng.integers(-5, 60, 2)
            x1, y1 = (-1, -1) if it % 3 else tuple(rng.integers(61, 140, 2))
            out = None if it % 2 else np.empty(rng.integers(40000, 60000), np.uint8)
            denom, channels = int(rng.choice([1, 2, 4, 8])), int(rng.choice([3, 4]))
            _jpegcrop.crop(d, denom, int(x0), int(y0), int(x1), int(y1), out, channels)
            decoded += 1
        except (ValueError, BufferError):
            refused += 1
    print(decoded, refused)
    """
)


@pytest.mark.parametrize("seed", [0, 1])
def test_damaged_jpegs_raise_value_error_and_never_crash(seed):
    proc = subprocess.run(
        [sys.executable, "-c", FUZZ, str(seed), "1500"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    decoded, refused = map(int, proc.stdout.split())
    assert decoded + refused == 1500 and decoded > 100 and refused > 100  # both outcomes exercised


def test_repeated_decodes_and_errors_do_not_leak():
    import io
    import resource

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    truncated = data[: len(data) // 2]

    def cycle(n):
        for _ in range(n):
            jpeg._jpegcrop.crop(data, 1, 10, 10, 200, 200)  # new bytes each time (~150 kB)
            jpeg._jpegcrop.header(data)
            with pytest.raises(ValueError):
                jpeg._jpegcrop.crop(truncated, 1, 0, 0, -1, -1)  # the error path frees what it allocated

    cycle(500)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cycle(5000)  # a 150 kB leak per call would be ~750 MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000  # kB
