#!/usr/bin/env bash
# The CUDA paths end to end on one GPU: tiny LoRA and full SFT in bf16 (+ fp16 LoRA with its
# GradScaler, and LoRA with CUDA-graphed steps), dataset inference on the LoRA checkpoint, export, then full-parameter FSDP2 training
# of the real shape (scripts/bench_full_sft.py). Writes logs and JSON under ${OUT:-/tmp/check_gpu}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/check_gpu}
mkdir -p "$OUT"
W=$(mktemp -d)
python3 scripts/make_tiny_checkpoint.py "$W/tiny" >/dev/null
for cfg in "lora bf16" "full bf16" "lora fp16" "lora bf16 --cuda_graphs true --lora_dropout_p 0 --gradient_checkpointing_layers 1"; do
  set -- $cfg
  python3 -m vlswift.cli sft --model_id_or_path "$W/tiny" --dataset examples/data/train.jsonl \
    --sft_type "$1" --dtype "$2" --max_steps 12 --save_steps 6 --eval_steps 6 --logging_steps 3 \
    --learning_rate 1e-3 --output_dir "$W/out-$1-$2${3:+-graphs}" --disable_tqdm true "${@:3}" 2>&1 | tail -3
  echo "sft $cfg: ok"
done
ckpt=$(ls -d "$W"/out-lora-bf16/qwen-vl-chat/v*/last)
python3 -m vlswift.cli infer --ckpt_dir "$ckpt" --val_dataset examples/data/train.jsonl \
  --do_sample false --max_new_tokens 8 --batch_size 2 --result_path "$OUT/infer.jsonl" 2>&1 | tail -2
python3 -m vlswift.cli export --ckpt_dir "$ckpt" --merge_lora true 2>&1 | tail -1
echo "infer + export on CUDA: ok"
python3 scripts/bench_full_sft.py --nproc 1 --freeze_vit true --steps 6 --out "$OUT/full_sft_h100.json"
