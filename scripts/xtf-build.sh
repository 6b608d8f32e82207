#!/bin/sh
# Builds XTF (the Xen Test Framework) into build/xtf for the environments trapless runs.
# usage: scripts/xtf-build.sh SOURCE DEST ENVS...
#   SOURCE: an XTF checkout (a directory) or a tarball of one; DEST: where to build.
# XTF's own `make` builds every environment of every test (32-bit ones too); we ask each
# test which environments it supports and build only the wanted ones.
set -eu
src=$1 dest=$2
shift 2
envs="$*"

if [ -d "$src" ]; then
    [ -f "$src/build/gen.mk" ] || { echo "xtf-build: $src is not an XTF checkout" >&2; exit 2; }
elif [ ! -f "$src" ]; then
    echo "xtf-build: $src: no such XTF checkout or tarball (set XTF=/path/to/xtf)" >&2
    exit 2
fi
for tool in gcc ld objcopy python3; do
    command -v $tool >/dev/null || { echo "xtf-build: $tool is needed to build XTF" >&2; exit 2; }
done

rm -rf "$dest"
mkdir -p "$dest"
if [ -d "$src" ]; then
    # Build a copy: a user's checkout stays as it was.
    (cd "$src" && tar --exclude=.git -cf - .) | tar -xf - -C "$dest"
else
    tar -xzf "$src" -C "$dest" --strip-components=1
fi
root=$(cd "$dest" && pwd)

jobs=${XTF_JOBS:-2}
# One test's make, given what XTF's top-level Makefile would export (the GCC toolchain).
xmake() {
    make -s -C "$dir" ROOT="$root" CC=gcc LD=ld "CPP=gcc -E" OBJCOPY=objcopy PYTHON=python3 "$@"
}
for dir in "$root"/tests/*/; do
    [ -f "$dir/Makefile" ] || continue
    # XTF's Makefiles print a variable with the `<name>var` target.
    name=$(xmake NAMEvar 2>/dev/null | sed 's/^NAME = //')
    have=$(xmake TEST-ENVSvar 2>/dev/null | sed 's/^TEST-ENVS = //')
    targets=
    for env in $envs; do
        case " $have " in *" $env "*) targets="$targets test-$env-$name" ;; esac
    done
    [ -n "$targets" ] || continue
    xmake -j"$jobs" $targets
done
echo "xtf-build: built $(ls "$root"/tests/*/test-* 2>/dev/null | grep -v '\.cfg$' | wc -l) images for $envs in $dest"
