#!/bin/bash
# Build the dcod .deb the Debian way (debhelper 13, dh-python/pybuild, pyproject):
#
#     packaging/deb/build.sh            -> dist/dcod_<version>_all.deb, then lintian on it
#
# The package is built from a copy of the source tree in build/deb/ (git-ignored): the files
# `git add -A` would commit (tracked files plus untracked ones that are not ignored), so
# .venv, __pycache__, *.egg-info and other ignored junk never get in. --tracked takes only
# the files git tracks (for release builds). The checkout itself is never written to except
# dist/ and build/deb/.
#
# Options: --tracked          only files git tracks
#          --out DIR          where the .deb goes (default: dist/)
#          --workdir DIR      the build tree (default: build/deb/); emptied first
#          --no-lintian       skip lintian
# Needs (Debian 12): debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools,
# and for the build-time import check python3-trio python3-sdnotify python3-psutil
# python3-tomli-w python3-httpx python3-prometheus-client (or DEB_BUILD_OPTIONS=nocheck); lintian.
set -euo pipefail
# Debian's tools and Debian's python3 only: not a venv's, pyenv's or /usr/local's
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE PIP_REQUIRE_VIRTUALENV

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/dist
work=$root/build/deb
tracked=0
lintian=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tracked) tracked=1 ;;
    --out) out=$2; shift ;;
    --workdir) work=$2; shift ;;
    --no-lintian) lintian=0 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

for tool in dpkg-buildpackage dpkg-parsechangelog dh git; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install debhelper dh-python pybuild-plugin-pyproject git)" >&2; exit 3; }
done

cd "$root"
upstream=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
version=$(dpkg-parsechangelog -l "$here/debian/changelog" -S Version)
if [ "${version%-*}" != "$upstream" ]; then
  echo "build.sh: debian/changelog says $version but pyproject.toml says $upstream: add a changelog entry (dch -v $upstream-1)" >&2
  exit 1
fi

# a clean copy of the source tree
src=$work/dcod-$upstream
rm -rf "$work"
mkdir -p "$src" "$out"
if [ "$tracked" = 1 ]; then list=(git ls-files -z); else list=(git ls-files -z --cached --others --exclude-standard); fi
"${list[@]}" | sort -zu | while IFS= read -r -d '' f; do
  # a tracked file deleted in the work tree is left out; packaging/deb/debian is copied below
  if { [ -e "$f" ] || [ -L "$f" ]; } && [ "${f#packaging/deb/debian/}" = "$f" ]; then
    printf '%s\0' "$f"
  fi
done | xargs -0 -r cp -P --parents -t "$src"
cp -r "$here/debian" "$src/debian"

# build (binary only; Rules-Requires-Root: no, so no fakeroot); the log stays in the work dir
if ! (cd "$src" && dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log" >&2
  echo "build.sh: dpkg-buildpackage failed; full log: $work/build.log" >&2
  exit 1
fi
deb=dcod_${version}_all.deb
mv -f "$work/$deb" "$out/$deb"
echo "$out/$deb"

if [ "$lintian" = 1 ]; then
  if command -v lintian >/dev/null; then
    # errors fail the build; warnings and info are shown
    lintian --display-info --fail-on error "$out/$deb"
  else
    echo "build.sh: lintian not installed; skipped" >&2
  fi
fi
