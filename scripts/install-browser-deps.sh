#!/usr/bin/env bash
# System packages the widget tests need, on Debian: Chromium (driven by
# Playwright through executable_path; Playwright's own browser download cannot
# work here) and Graphviz's `dot` (the widgets' static SVG fallback).
# Idempotent: installs only what is missing. Run as root.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v dot >/dev/null 2>&1 || missing+=(graphviz)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-browser-deps: installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq "${missing[@]}" >/dev/null
command -v chromium >/dev/null && command -v dot >/dev/null
