# Sourced by the scripts that build Go programs from pinned modules (Jaeger, helm,
# oauth2-proxy, the demo's store and MES, the Go test clients). One way to build them:
#
#   go_build NAME MODULE_DIR CACHE "FILES" BIN=PACKAGE [BIN=PACKAGE ...]
#
# builds each PACKAGE (inside MODULE_DIR) into <repo>/.tools/BIN. FILES (patterns
# relative to MODULE_DIR, in the order given) are hashed; the hash is kept in
# <repo>/.tools/NAME.stamp, and nothing is built while the binaries are there with the
# same hash. With CACHE=1 each binary is also kept in $SONDE_TOOLS_CACHE (default
# ~/.cache/sonde) as BIN-<hash>, so a fresh clone on the same machine (CI) copies it
# instead of building again. The caller defines `log`.

go_build() {
  local name="$1" dir="$2" keep="$3" files="$4"
  shift 4
  local root tools cache
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  tools="$root/.tools"
  cache="${SONDE_TOOLS_CACHE:-$HOME/.cache/sonde}"
  if ! command -v go >/dev/null; then
    log "Go is not installed (expected at /usr/local/go/bin/go; scripts/setup.sh): $name cannot be built"
    return 1
  fi
  local hash
  # shellcheck disable=SC2086 # FILES are patterns, expanded in the module's directory
  hash="$(cd "$dir" && shopt -s nullglob && cat $files | sha256sum | cut -d' ' -f1)"
  local stamp="$tools/$name.stamp" spec bin all_there=1
  for spec in "$@"; do
    [ -x "$tools/${spec%%=*}" ] || all_there=0
  done
  if [ "$all_there" = 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    log "$name: present ($tools)"
    return 0
  fi
  mkdir -p "$tools"
  if [ "$keep" = 1 ]; then
    local cached=1
    for spec in "$@"; do
      [ -x "$cache/${spec%%=*}-$hash" ] || cached=0
    done
    if [ "$cached" = 1 ]; then
      for spec in "$@"; do
        bin="${spec%%=*}"
        cp -f "$cache/$bin-$hash" "$tools/$bin.tmp" && mv -f "$tools/$bin.tmp" "$tools/$bin"
      done
      echo "$hash" > "$stamp"
      log "$name: present ($tools, from $cache)"
      return 0
    fi
  fi
  log "$name: building $*"
  local start
  start=$(date +%s)
  for spec in "$@"; do
    bin="${spec%%=*}"
    # -p 2: these machines have 2 cores; -mod=readonly: GOFLAGS from the caller could
    # make the build write go.mod.
    (cd "$dir" && GOFLAGS=-mod=readonly go build -p 2 -trimpath -buildvcs=false \
      -o "$tools/$bin.tmp" "${spec#*=}")
    mv -f "$tools/$bin.tmp" "$tools/$bin"
  done
  echo "$hash" > "$stamp"
  if [ "$keep" = 1 ] && mkdir -p "$cache" 2>/dev/null; then
    for spec in "$@"; do
      bin="${spec%%=*}"
      if cp -f "$tools/$bin" "$cache/$bin-$hash.tmp" 2>/dev/null; then
        mv -f "$cache/$bin-$hash.tmp" "$cache/$bin-$hash"
      fi
    done
  fi
  log "$name: built in $(( $(date +%s) - start )) s"
}
