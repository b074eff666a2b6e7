#!/usr/bin/env bash
# The demo run (configs/demo.yaml) with the previous release's package and this one, interleaved,
# in one session; then whether their files are byte-identical.
#   bash benchmarks/compare_previous_release.sh [COMMIT] [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:-8a5728c}
repeats=${2:-2}
work=$(mktemp -d)
git archive "$commit" qstar_cli | tar -x -C "$work"
# The installed (editable) qstar would shadow the extracted package: drop its finder first.
old="import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in type(f).__module__]; sys.path.insert(0, '$work'); from qstar_cli.cli import app; app(prog_name='qstar')"
for i in $(seq "$repeats"); do
    .venv/bin/python -c "$old" generate --config configs/demo.yaml --output "$work/old$i.jsonl" --overwrite 2>&1 | grep "samples in" | sed "s#^#previous ($commit): #"
    .venv/bin/python -m qstar_cli generate --config configs/demo.yaml --output "$work/new$i.jsonl" --overwrite 2>&1 | grep "samples in" | sed "s#^#this release: #"
done
# Sidecar lines say their format_version (first key) since it was added; a release before has none.
without_version() { sed 's/^{"format_version":[0-9]*,/{/' "$1"; }
for f in .jsonl .diagnostics.jsonl; do
    cmp -s <(without_version "$work/old1$f") <(without_version "$work/new1$f") && echo "identical: *$f (format_version aside)" || echo "DIFFERENT: *$f"
done
