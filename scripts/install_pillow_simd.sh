#!/usr/bin/env bash
# Replace Pillow by pillow-simd, built with AVX2 when the CPU has it (resize ~6x faster than stock Pillow).
# Falls back to stock Pillow, with a notice, when the build fails. Idempotent.
set -u
py=${1:-python3}
if "$py" -c 'import PIL, sys; sys.exit(0 if ".post" in PIL.__version__ else 1)' 2>/dev/null; then
    echo "pillow-simd already installed: $("$py" -c 'import PIL; print(PIL.__version__)')"
    exit 0
fi
cflags=""
if grep -q avx2 /proc/cpuinfo 2>/dev/null; then cflags="-mavx2"; fi
"$py" -m pip uninstall -q -y pillow pillow-simd >/dev/null 2>&1 || true
if CC="cc $cflags" "$py" -m pip install -q --no-cache-dir pillow-simd; then
    echo "pillow-simd installed ($("$py" -c 'import PIL; print(PIL.__version__)'), CC flags: ${cflags:-none})"
else
    echo "NOTICE: pillow-simd did not build here; falling back to stock Pillow (resizing will be slower)." >&2
    "$py" -m pip install -q pillow
fi
