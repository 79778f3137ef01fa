#!/usr/bin/env bash
# Fails (exit 1) when this machine cannot compile and run the Swift export: CI on a machine kind that has
# Swift calls this before the tests, so the Swift checks cannot be skipped there by accident.
# Usage: swift_bridge/check_toolchain.sh   (prints the toolchain it found)
set -euo pipefail
if ! command -v swift >/dev/null 2>&1; then
    echo "check_toolchain: swift is not on PATH; the export-swift compile checks need Swift 6.x (swift.org)" >&2
    exit 1
fi
version="$(swift --version 2>/dev/null | head -n 1)"
if [ -z "$version" ]; then
    echo "check_toolchain: \`swift --version\` failed" >&2
    exit 1
fi
# XCTest ships with the toolchain on Linux; a toolchain without it cannot run the golden tests.
if ! swift test --help >/dev/null 2>&1; then
    echo "check_toolchain: \`swift test\` is unavailable ($version)" >&2
    exit 1
fi
echo "check_toolchain: $version"
