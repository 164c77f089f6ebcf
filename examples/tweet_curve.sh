#!/usr/bin/env bash
# Learning curve on tweet sentiment (negative / neutral / positive) with MiniLM: how many labelled tweets per class
# does each method need? SetFit-style few-shot vs full fine-tuning vs LoRA, at k = 4, 8, 16, 32, 64 examples per
# class and "all" (capped at 2000 training rows to stay CPU-friendly), 3 seeds each (each seed draws other tweets),
# all scored on the same 500 test tweets. Writes runs/tweet-curve/{curve.csv,curve.json,report.html} and one
# run folder per point under runs/tweet-curve/runs/.
#
# A fixed budget per point, and no peeking: each classify run takes 150 optimizer steps of 16 rows and is scored
# once, at the end (eval.select_best=false: picking the best checkpoint on the test tweets would flatter it);
# each few-shot run trains on at most 3000 contrastive pairs. 6 k × 3 seeds × 3 methods = 54 runs, about an
# hour on 2 CPU cores. Interrupted? Run the same command again: finished runs are kept, the unfinished one
# resumes. A smaller check: --shots 4,8 --seeds 2.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/tunelab curve examples/tweet_sentiment.yaml \
  --shots 4,8,16,32,64,all --seeds 3 --methods fewshot,full,lora \
  --output "${1:-runs/tweet-curve}" \
  model.name=minilm data.train_size=2000 data.eval_size=500 \
  train.max_steps=150 train.checkpoint_every=150 eval.select_best=false fewshot.max_pairs=3000
