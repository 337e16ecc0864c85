#!/usr/bin/env bash
# Builds the Debian package: target/deb/flotilla_<version>_<arch>.deb, with the static release
# binary (scripts/build-static.sh), the systemd units, /etc/flotilla/*.toml as conffiles and
# maintainer scripts that create the flotilla system user. Checked with lintian (no error).
#
#   scripts/build-deb.sh [--version V] [--binary PATH] [--out DIR]
#
# --binary packages another build of flotilla (the tests package the one they built).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
binary=""
out=target/deb
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--version V] [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
arch=$(dpkg --print-architecture)
if [ -z "$binary" ]; then
  ./scripts/build-static.sh >&2
  target=$(rustc -vV | sed -n 's/^host: //p')
  binary="${CARGO_TARGET_DIR:-target}/$target/release/flotilla"
fi
[ -x "$binary" ] || { echo "no flotilla binary at $binary" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/flotilla_${version}_${arch}"
install -D -m 0755 "$binary" "$root/usr/bin/flotilla"
for unit in packaging/systemd/*.service; do
  install -D -m 0644 "$unit" "$root/lib/systemd/system/$(basename "$unit")"
done
for conf in packaging/etc/*.toml; do
  install -D -m 0644 "$conf" "$root/etc/flotilla/$(basename "$conf")"
done
doc="$root/usr/share/doc/flotilla"
install -D -m 0644 packaging/debian/copyright "$doc/copyright"
install -D -m 0644 README.md "$doc/README.md"
printf 'flotilla (%s) stable; urgency=medium\n\n  * Release %s.\n\n -- flotilla developers <dev@flotilla.dev>  %s\n' \
  "$version" "$version" "$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" \
  | gzip -9n > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"
install -D -m 0644 packaging/debian/lintian-overrides "$root/usr/share/lintian/overrides/flotilla"
install -d -m 0755 "$root/DEBIAN"
for script in postinst prerm postrm; do
  install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
(cd "$root" && find etc -type f | sed 's|^|/|' | sort) > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  packaging/debian/control.in > "$root/DEBIAN/control"
mkdir -p "$out"
deb="$out/flotilla_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
if command -v lintian >/dev/null 2>&1; then
  # Errors fail the build; warnings are shown.
  lintian --fail-on error --suppress-tags bad-distribution-in-changes-file "$deb" >&2
fi
echo "$deb"
