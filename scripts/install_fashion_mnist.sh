#!/usr/bin/env bash
# Make Fashion-MNIST available for `make demo` (Debian package dataset-fashion-mnist, MIT licence).
# Does nothing when it is already there; prints where to get it when it cannot install it.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }
fi
if [ ! -f "$dir/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST not found: install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)" >&2
    echo "or download the four *-ubyte.gz files and run: make demo DEMO_ARGS='--fashion-mnist DIR'" >&2
    exit 1
fi
