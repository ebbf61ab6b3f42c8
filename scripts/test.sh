#!/usr/bin/env bash
# Run the test suite (sets up first, so it works on a fresh clone). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
