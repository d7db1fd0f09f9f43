#!/usr/bin/env bash
# `make posttrain`: SFT then GRPO on the `add` task, from scratch on the CPU, with the dsv3 CLI.
#
#   1. dsv3 train: a debug-preset run widened to hidden_size 128 and 3 layers (0.4M parameters), 3 steps
#      (a run directory with a tokenizer; the weights are still near random);
#   2. dsv3 sft: SFT on gold records of add:digits=$DIGITS (bare answers) at a constant LR, stopped
#      early, while the held-out greedy accuracy is still well below 1 (about 0.5: a longer run of this
#      model reaches 0.99);
#   3. dsv3 grpo: GRPO from the SFT model with the task's verifier as the reward;
#   4. dsv3 eval: held-out greedy accuracy (problems no stage trained on) after SFT and after GRPO,
#      and a sample from the final model (dsv3.inference.LLM).
#
# Every setting is an environment variable (WORK, DIGITS, SFT_STEPS, GRPO_STEPS, ...); seeds are fixed.
set -euo pipefail

DSV3=${DSV3:-.venv/bin/dsv3}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/posttrain}
DIGITS=${DIGITS:-2}
TASK="add:digits=$DIGITS"
SFT_RECORDS=${SFT_RECORDS:-3000}
SFT_STEPS=${SFT_STEPS:-450}
SFT_LR=${SFT_LR:-3e-3}
GRPO_STEPS=${GRPO_STEPS:-100}
GRPO_LR=${GRPO_LR:-1e-4}
G=${G:-8}
PROMPTS=${PROMPTS:-8}
LIMIT=${LIMIT:-200}
NO_PROGRESS=(--no-progress)

start=$(date +%s)
rm -rf "$WORK"
mkdir -p "$WORK"
echo "== posttrain in $WORK: $TASK, SFT $SFT_STEPS steps, GRPO $GRPO_STEPS steps (G=$G x $PROMPTS prompts)"

set -x
"$DSV3" train --preset debug --steps 3 --out "$WORK/base" --no-sample "${NO_PROGRESS[@]}" \
    hidden_size=128 num_hidden_layers=3 >"$WORK/base.log"
"$PY" -c "import sys; from dsv3.tasks import get_task, write_jsonl
write_jsonl(sys.argv[1], get_task(sys.argv[2]).sft_records(int(sys.argv[3])))" \
    "$WORK/sft.jsonl" "$TASK" "$SFT_RECORDS"
"$DSV3" sft --from "$WORK/base" --data "$WORK/sft.jsonl" --out "$WORK/sft" --steps "$SFT_STEPS" \
    "${NO_PROGRESS[@]}" seq_len=64 batch_size=16 lr="$SFT_LR" decay_start_frac=1.0 decay_end_frac=1.0 \
    >"$WORK/sft.log"
"$DSV3" eval --checkpoint "$WORK/sft" --task "$TASK" --samples 0 --limit "$LIMIT" --no-think \
    --max-new-tokens 8 | tee "$WORK/eval_sft.json"
"$DSV3" grpo --from "$WORK/sft" --task "$TASK" --out "$WORK/grpo" --steps "$GRPO_STEPS" --no-think \
    "${NO_PROGRESS[@]}" num_generations="$G" prompts_per_step="$PROMPTS" lr="$GRPO_LR" beta=0 \
    loss_type=dapo temperature=1.0 max_completion_length=8 sample_every=20 >"$WORK/grpo.log"
"$DSV3" eval --checkpoint "$WORK/grpo" --task "$TASK" --samples 0 --limit "$LIMIT" --no-think \
    --max-new-tokens 8 | tee "$WORK/eval_grpo.json"
set +x

"$PY" - "$WORK" "$TASK" "$(($(date +%s) - start))" <<'PYEOF'
import json, sys
from pathlib import Path

from dsv3.inference import LLM, SamplingParams
from dsv3.tasks import get_task
from dsv3.tasks.prompts import prompt_ids

work, spec, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sft, grpo = (json.loads((work / f"eval_{k}.json").read_text()) for k in ("sft", "grpo"))
task = get_task(spec)
llm = LLM(str(work / "grpo"), max_batch_size=4)
params = SamplingParams(max_new_tokens=8, temperature=0.0)
print(f"\nsample (held-out problems, greedy, after GRPO):")
for p in task.split("test", 4):
    text = llm.generate([prompt_ids(llm.tokenizer, p, think=False)], params)[0].text
    print(f"  {p.prompt} -> {text.strip()!r} ({'right' if task.verify(p, text) else 'wrong'}, answer {p.answer})")
print(
    f"\nheld-out greedy accuracy on {spec} ({sft['problems']} problems): after SFT {sft['greedy_pass@1']:.3f}, "
    f"after GRPO {grpo['greedy_pass@1']:.3f}  ({seconds} s)"
)
PYEOF
