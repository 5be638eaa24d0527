"""Only the two optional C extensions live here; everything else is in pyproject.toml.

Both build against the system libjpeg-turbo headers, the same ones pillow-simd needs (Debian/Ubuntu
``libjpeg-dev``, RHEL/Fedora ``libjpeg-turbo-devel``). They are optional: without a compiler or the headers the
install still succeeds and the pure-Python code runs instead, slower; ``python -c "import vggdist._jpegcrop,
preprocess._moments"`` says whether they were built.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # training-crop decoding: only the window of the JPEG the crop needs (vggdist.transforms)
        Extension("vggdist._jpegcrop", ["vggdist/_jpegcrop.c"], libraries=["jpeg"], optional=True),
        # exact integer RGB moments for stats.json (preprocess.stats)
        Extension("preprocess._moments", ["preprocess/_moments.c"], extra_compile_args=["-O3"], optional=True),
    ]
)
