#!/bin/sh
# Build trapless's patched libunicorn (third_party/unicorn) into build/unicorn: Unicorn
# 2.1.4's source distribution from the package index (pip download, checked against its
# sha256), our patches (third_party/unicorn/*.patch, in name order), x86 only (about a minute and a half of two cores). On failure: one
# line saying so, the log in build/unicorn/build.log, nothing half-built left where bt
# would load it (bt then runs on the unicorn package's own library).
#
#   scripts/unicorn-build.sh VENV_BIN      (make setup)
set -eu
bin=$1
version=2.1.4
sha256=00567a70e323f749b419cd86bee4f9115beab7ebba32194581c090cbb7c59cff
patches=$(ls "$(pwd)"/third_party/unicorn/*.patch)
out=build/unicorn
log=$out/build.log
work=$out/work

mkdir -p "$out"
: >"$log"
fail() {
    echo "make setup: the patched Unicorn did not build ($1; see $log); bt runs on the unicorn package's library" >&2
    exit 1
}

sdist=$out/unicorn-$version.tar.gz
if ! echo "$sha256  $sdist" | sha256sum -c --status 2>/dev/null; then
    rm -rf "$out/dl"
    "$bin/pip" download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
        -d "$out/dl" "unicorn==$version" >>"$log" 2>&1 || fail "pip download unicorn==$version"
    mv "$out/dl/unicorn-$version.tar.gz" "$sdist" 2>>"$log" || fail "no unicorn-$version.tar.gz downloaded"
    rm -rf "$out/dl"
    echo "$sha256  $sdist" | sha256sum -c --status || fail "unicorn-$version.tar.gz is not the expected file (sha256)"
fi

# cmake: the system's, else one from the package index into the venv
if command -v cmake >/dev/null 2>&1; then
    cmake=cmake
else
    [ -x "$bin/cmake" ] || "$bin/pip" install --quiet --disable-pip-version-check cmake >>"$log" 2>&1 ||
        fail "no cmake, and pip install cmake failed"
    cmake=$bin/cmake
fi

rm -rf "$work"
mkdir -p "$work"
tar xzf "$sdist" -C "$work" >>"$log" 2>&1 || fail "cannot unpack $sdist"
src=$work/unicorn-$version/src
for patch in $patches; do
    patch -p1 -d "$src" <"$patch" >>"$log" 2>&1 || fail "$(basename "$patch") does not apply"
done
"$cmake" -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DUNICORN_BUILD_TESTS=off \
    -DUNICORN_ARCH=x86 >>"$log" 2>&1 || fail "cmake"
make -C "$src/build" -j"$(nproc)" unicorn >>"$log" 2>&1 || fail "make"
cp "$src/build/libunicorn.so.2" "$out/libunicorn.so.2.new" &&
    mv "$out/libunicorn.so.2.new" "$out/libunicorn.so.2" || fail "cannot install the library"
rm -rf "$work"
echo "make setup: built $out/libunicorn.so.2 (Unicorn $version with $(cd third_party/unicorn && echo *.patch))"
