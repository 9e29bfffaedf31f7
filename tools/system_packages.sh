#!/usr/bin/env bash
# Installs the Debian packages the project uses, when missing and when this shell may (root with
# apt-get); otherwise says how. Never fails the caller: every package here is optional.
#
#   tools/system_packages.sh demo   libtcmalloc-minimal4 (faster CPU runs: the CLI preloads it)
#   tools/system_packages.sh test   + chromium and fonts-noto-cjk (the annotation app's browser
#                                   tests; they skip without them)
set -uo pipefail
want=(libtcmalloc-minimal4)
[[ "${1:-demo}" == test ]] && want+=(chromium fonts-noto-cjk)

missing=()
for pkg in "${want[@]}"; do
  case "$pkg" in
    libtcmalloc-minimal4) ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || missing+=("$pkg") ;;
    chromium) [[ -x /usr/bin/chromium ]] || missing+=("$pkg") ;;
    fonts-noto-cjk) fc-list 2>/dev/null | grep -qi "Noto Sans CJK" || missing+=("$pkg") ;;
  esac
done
((${#missing[@]})) || exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} (apt-get)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
    >/tmp/pdpo-system-packages.log 2>&1 || echo "warning: apt-get failed (see /tmp/pdpo-system-packages.log); continuing without ${missing[*]}"
else
  echo "optional system packages missing: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}"
fi
exit 0
