"""Evaluation: metrics per task family and scoring a model on a dataset."""

# The metrics a run is judged by, in order of preference: the console's result line, the web board's runs table
# and the export's model card show the first ones present before and after. (No imports here: the CLI's light
# modules read this list.)
HEADLINE_METRICS = ("accuracy", "macro_f1", "loss", "perplexity", "exact_match", "rouge_l", "pairwise_accuracy",
                    "preference_accuracy", "label_accuracy", "reward_margin", "mean_reward", "recall_at_1",
                    "recall_at_10", "mrr_at_10", "ndcg_at_10")

# How the console, the report and the web board name the built-in general-ability probes (evaluation/retention.py)
PROBE_NAMES = {"piqa": "PIQA", "wikitext": "WikiText"}
