"""`tunelab tune`: hyperparameter search on Optuna that never reads the split it reports (issue 29, in progress).

Plan (space.py is built; the rest is next):
- study.py: before any trial, write the trials' own data folder into the study folder: train.jsonl (train minus the
  validation rows) and test.jsonl (the validation rows: the source's validation split, or a seeded stratified slice
  of train, by the rules `train` uses), reading the source with its test split skipped (load_splits gains `skip`).
  Every trial is then an ordinary `api.train` run on that folder, so its "reported" metric is a validation metric
  and the stages need no change; the test file is opened only by the final runs (a test proves it).
- Trials: optuna.create_study(storage=sqlite:///study/optuna.db by default, or --storage URL / a JournalStorage
  file), study.optimize with --trials/--timeout; --workers K processes on one machine share the storage, each with
  cores/K torch threads. Pruning: a TrainerCallback that reports the per-epoch validation metric to the trial and
  stops a trial Optuna prunes (HyperbandPruner / SuccessiveHalvingPruner); a pruned trial keeps a light summary.
- After the search: the best values as recipe.yaml (trainable with `tunelab train`); the winner and the user's own
  recipe each trained once on train+validation and scored once on the reported split; the paired interval of the
  difference (evaluation.uncertainty), "no significant change" when it includes 0.
- report.html: optuna.visualization's history, parameter importances and parallel coordinates (plotly, offline).
- Knobs: method.use_rslora, method.init_lora_weights (pissa/olora), method.loraplus_lr_ratio
  (peft.optimizers.create_loraplus_optimizer), train.neftune_noise_alpha (sft).
"""
