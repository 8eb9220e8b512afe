#!/usr/bin/env bash
# CTranslate2 in its own venv (.venv-ct2) for `make bench`'s ct2-* variants: ctranslate2
# itself plus what ct2-transformers-converter imports (torch, transformers) to convert the
# bench's checkpoint. Idempotent: a finished install leaves .venv-ct2/.installed and a
# second run returns at once; an interrupted one is finished by the next.
#
# Usage: tools/peers/setup_ct2.sh [PYTHON]   (default python3; run from anywhere)
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON="${1:-python3}"
VENV=.venv-ct2
STAMP="$VENV/.installed"
# 4.8.5: the newest 4.x on PyPI; its converter loads GPT-2 with from_pretrained(dtype=...),
# the transformers >= 4.56 keyword, and runs with transformers 5 (the bench's own).
CT2="ctranslate2==4.8.5"
# torch by exact version first: the CPU wheel from local disk. A bare `torch` requirement
# would pull a CUDA build (GBs) that this CPU-only peer never uses.
TORCH="torch==2.13.0"
TRANSFORMERS="transformers>=4.56,<6"

if [ -f "$STAMP" ]; then
  echo "$VENV is ready ($STAMP exists)"
  exit 0
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup_ct2.sh: no interpreter '$PYTHON'; pass one, e.g. tools/peers/setup_ct2.sh python3.11" >&2
  exit 2
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH"
"$VENV/bin/pip" install -q "$CT2" "$TRANSFORMERS" numpy psutil
# A CUDA torch must not have slipped in through a dependency: fail loudly if it did.
"$VENV/bin/python" - <<'PY'
import torch, ctranslate2, transformers
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build; reinstall torch==2.13.0 (CPU)"
print(f"ctranslate2 {ctranslate2.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
PY
touch "$STAMP"
echo "$VENV ready in $(( $(date +%s) - start ))s, $(du -sh "$VENV" | cut -f1)"
