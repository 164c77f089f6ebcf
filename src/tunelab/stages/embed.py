"""Embedding training (task embed): load pairs → load the sentence encoder → score retrieval before → train with
sentence-transformers' trainer and loss → score after → write run. Also what the task's finished runs export.

Training is sentence-transformers' own: `SentenceTransformerTrainer` with MultipleNegativesRankingLoss on (query,
positive) pairs (each query against its own positive and every other positive of the batch; batches never hold the
same text twice, which would make a positive its own negative) or CoSENTLoss on scored pairs (embed.loss).

Scoring is retrieval on the held-out pairs: every eval query searches all eval positives, and the positives paired
with it are the relevant ones. sentence-transformers' InformationRetrievalEvaluator computes recall@1, recall@10,
MRR@10 and nDCG@10. The intervals need each query's own values, which the evaluator does not return, so the
similarity scores it ranks by are kept (its score function is wrapped) and each positive's rank is read from those
same numbers, ties broken by document id as the evaluator breaks them; tests check that the means of the
per-query values equal the evaluator's figures.

The run's model/ is a sentence-transformers folder: `SentenceTransformer(run/model)` loads it, `tunelab serve`
answers /v1/embeddings with it, and `tunelab export` writes it as a sentence-transformers folder (hf) or as one ONNX
graph that outputs the sentence embedding (onnx).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer import losses
from sentence_transformers.sentence_transformer.evaluation import (
    EmbeddingSimilarityEvaluator,
    InformationRetrievalEvaluator,
)
from transformers import set_seed

from tunelab.console import say
from tunelab.data.pairs import PairData, load_pair_data
from tunelab.distributed import is_main_process
from tunelab.errors import TunelabError
from tunelab.lifecycle import train_and_rescore
from tunelab.methods.apply import count_parameters
from tunelab.models.loading import ModelSource, check_encoder, existing_model
from tunelab.models.sentence_encoder import load_sentence_encoder
from tunelab.recipe import Recipe
from tunelab.runs.artifacts import finish_run, load_or_score_baseline, save_folder_atomically
from tunelab.runs.folder import write_jsonl_atomic
from tunelab.trainer import (
    JsonlLogCallback,
    MeteredMixin,
    TunelabMixin,
    resolve_bf16,
    training_arguments,
)

CUTOFF = 10  # recall@10, MRR@10, nDCG@10
RETRIEVAL_METRICS = ("recall_at_1", "recall_at_10", "mrr_at_10", "ndcg_at_10")
EVALUATOR_NAMES = {"recall_at_1": "recall@1", "recall_at_10": "recall@10", "mrr_at_10": "mrr@10",
                   "ndcg_at_10": "ndcg@10"}  # tunelab's key → the evaluator's (after its score function's name)
SHOWN_PREDICTIONS = 12  # predictions in the report; all are in predictions.jsonl


def load_data(recipe: Recipe) -> PairData:
    """The recipe's pairs, with scores when its loss reads them."""
    return load_pair_data(recipe.data, scored=recipe.embed.loss == "cosent")


def check_model(recipe: Recipe, data: PairData, import_code: bool = True) -> ModelSource:
    """The model exists and is an encoder (its sentence embedding is what trains)."""
    source = existing_model(recipe.model.name)
    check_encoder(source, f"task embed tunes a sentence encoder, but '{recipe.model.name}' is a decoder; use an "
                          f"encoder (minilm, mpnet-base)")
    return source


class EmbedTrainer(TunelabMixin, SentenceTransformerTrainer):
    """sentence-transformers' trainer as tunelab's stages train: tunelab's bar and log, its meter, memory kept."""

    def add_model_card_callback(self, default_args_dict: dict) -> None:
        """No sentence-transformers model card: exports write tunelab's (its callback would also draw its own bar
        while sampling widget examples)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Count every text column's rows and tokens (a sentence-transformers batch holds `<column>_input_ids`,
        which MeteredMixin's count of `input_ids` would miss), then train as the trainer does (without
        MeteredMixin's DDP communication timing: embed trains in one process as measured here)."""
        for key in [key for key in inputs if key.endswith("_input_ids")]:
            column = key.removesuffix("_input_ids")
            self.meter.count_batch({"input_ids": inputs[key], "attention_mask": inputs.get(f"{column}_attention_mask")})
        return super(MeteredMixin, self).training_step(model, inputs, num_items_in_batch)


def run(recipe: Recipe, data: PairData, source: ModelSource, run_dir: Path, resume: bool = False) -> dict:
    """Fine-tune a sentence encoder on pairs as the recipe says; write the run folder and return metrics.json's
    content."""
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    model = load_sentence_encoder(source.location, recipe.model.max_length, "embed")
    mnrl = recipe.embed.loss == "mnrl"
    loss = (losses.MultipleNegativesRankingLoss if mnrl else losses.CoSENTLoss)(model)
    params = count_parameters(model)
    relevant_from = relevance_threshold(data) if data.scored else None
    say(f"tunelab: the whole encoder trains ({params.total:,} parameters) with {type(loss).__name__}; "
        f"{len(data.train)} train pairs, {len(data.eval)} eval pairs ({data.eval_split})")

    def score() -> dict:
        return score_embeddings(model, data.eval, recipe.eval.batch_size, relevant_from)

    before = load_or_score_baseline(run_dir, score)
    say(f"tunelab: before training: {describe(before)}")

    args = training_arguments(recipe.train, recipe.eval, run_dir, bf16, args_class=SentenceTransformerTrainingArguments,
                              batch_sampler=BatchSamplers.NO_DUPLICATES if mnrl else BatchSamplers.BATCH_SAMPLER)
    trainer = EmbedTrainer(model=model, args=args, train_dataset=data.train, loss=loss,
                           callbacks=[JsonlLogCallback(run_dir / "log.jsonl")])
    metrics = train_and_rescore(trainer, score, before, recipe, data, run_dir, resume, params=params, bf16=bf16,
                                save=lambda target: save_folder_atomically(target, lambda folder: model.save_pretrained(
                                    str(folder), create_model_card=False)))
    section = write_retrieval_predictions(run_dir, before, metrics["after"])
    metrics = {
        **metrics,
        "loss": recipe.embed.loss,
        "queries": section["queries"],
        "documents": section["documents"],
        **({"relevant_from_score": relevant_from} if relevant_from is not None else {}),
    }
    return finish_run(run_dir, recipe, metrics, f"tunelab embedding run: {recipe.name}",
                      extra_sections=[("Retrieval on the held-out pairs", section["html"])])


def describe(scores: dict) -> str:
    """'recall@1 0.2937, recall@10 0.5675, MRR@10 0.3743, nDCG@10 0.4190 (252 queries, 252 documents)'."""
    shown = ", ".join(f"{EVALUATOR_NAMES[key].replace('mrr', 'MRR').replace('ndcg', 'nDCG')} {scores[key]:.4f}"
                      for key in RETRIEVAL_METRICS)
    spearman = f", Spearman {scores['spearman']:.4f}" if "spearman" in scores else ""
    found = scores["per_query"]
    return f"{shown}{spearman} ({len(found['rank'])} queries, {found['documents']} documents)"


# Scoring: retrieval on the held-out pairs -------------------------------------------------------------------------

def retrieval_task(pairs, relevant_from: float | None = None) -> tuple[dict, dict, dict]:
    """(queries, corpus, relevant documents) of the evaluator from eval pairs: each distinct query once, each distinct
    positive once, a query's relevant documents its own positives (scored pairs: those scored at least
    `relevant_from`). Ids are zero-padded numbers, so their string order (the evaluator's tie-break) is their order."""
    texts = list(dict.fromkeys(pairs["positive"]))
    width = len(str(len(texts)))
    document = {text: f"{i:0{width}d}" for i, text in enumerate(texts)}
    relevant: dict[str, set[str]] = {}
    scores = pairs["score"] if relevant_from is not None else [None] * len(pairs)
    for query, positive, score in zip(pairs["query"], pairs["positive"], scores, strict=True):
        found = relevant.setdefault(query, set())
        if score is None or score >= relevant_from:
            found.add(document[positive])
    queries = [query for query, found in relevant.items() if found]
    if not queries:
        raise TunelabError(f"no eval pair is scored at least {relevant_from} (the middle of the training scores), so "
                           f"no query has a text to find; check data.label")
    width = len(str(len(queries)))
    query_ids = {query: f"{i:0{width}d}" for i, query in enumerate(queries)}
    return ({query_ids[query]: query for query in queries}, {i: text for text, i in document.items()},
            {query_ids[query]: relevant[query] for query in queries})


def score_embeddings(model, pairs, batch_size: int, relevant_from: float | None = None) -> dict:
    """Retrieval metrics on eval pairs through InformationRetrievalEvaluator, each with its per-query values (under
    `per_row`, for the intervals) and, under `per_query`, each query with its positive, the best rank of a relevant
    document and its top hit; for scored pairs also the Spearman correlation of similarity and score."""
    queries, corpus, relevant = retrieval_task(pairs, relevant_from)
    kept: list[torch.Tensor] = []

    def similarity(query_embeddings: torch.Tensor, document_embeddings: torch.Tensor) -> torch.Tensor:
        scores = model.similarity(query_embeddings, document_embeddings)
        kept.append(scores.float().cpu())  # one block per corpus chunk, in corpus order
        return scores

    name = model.similarity_fn_name
    evaluator = InformationRetrievalEvaluator(
        queries, corpus, relevant, mrr_at_k=[CUTOFF], ndcg_at_k=[CUTOFF], accuracy_at_k=[1, CUTOFF],
        precision_recall_at_k=[1, CUTOFF], map_at_k=[CUTOFF], batch_size=batch_size, write_csv=False,
        score_functions={name: similarity})
    figures = evaluator(model)
    ids = evaluator.queries_ids
    per_query = per_query_metrics(torch.cat(kept, dim=1).numpy(), [sorted(relevant[q]) for q in ids],
                                  evaluator.corpus_ids)
    scores = {key: round(float(figures[f"{name}_{EVALUATOR_NAMES[key]}"]), 6) for key in RETRIEVAL_METRICS}
    if relevant_from is not None:
        scores["spearman"] = round(float(EmbeddingSimilarityEvaluator(
            pairs["query"], pairs["positive"], pairs["score"], batch_size=batch_size, write_csv=False,
            main_similarity=name)(model)[f"spearman_{name}"]), 6)
    return {**scores, "per_row": {key: per_query[key] for key in RETRIEVAL_METRICS},
            "per_query": {"documents": len(corpus), "query": [queries[q] for q in ids],
                          "positive": [corpus[min(relevant[q])] for q in ids], "rank": per_query["rank"],
                          "top_hit": [corpus[evaluator.corpus_ids[i]] for i in per_query["top_hit"]]}}


def per_query_metrics(scores: np.ndarray, relevant: list[list[str]], corpus_ids: list[str]) -> dict[str, list]:
    """Each query's recall@1, recall@10, MRR@10 and nDCG@10 (as the evaluator defines them), its best rank of a
    relevant document and its top hit, from the query × document similarities. A document's rank is 1 + the
    documents scored higher + those scored the same with a smaller id (the evaluator's tie-break)."""
    column = {doc: i for i, doc in enumerate(corpus_ids)}
    order = np.argsort(np.asarray(corpus_ids, dtype=object), kind="stable")  # id order, as the evaluator sorts ties
    result: dict[str, list] = {key: [] for key in (*RETRIEVAL_METRICS, "rank", "top_hit")}
    for row, documents in zip(scores, relevant, strict=True):
        ranks = sorted(rank_of(row, column[doc], order) for doc in documents)
        hits = [rank for rank in ranks if rank <= CUTOFF]
        ideal = sum(1 / math.log2(i + 2) for i in range(min(len(documents), CUTOFF)))
        result["recall_at_1"].append(sum(rank <= 1 for rank in ranks) / len(ranks))
        result["recall_at_10"].append(len(hits) / len(ranks))
        result["mrr_at_10"].append(1 / hits[0] if hits else 0.0)
        result["ndcg_at_10"].append(sum(1 / math.log2(rank + 1) for rank in hits) / ideal)
        result["rank"].append(ranks[0])
        best = row.max()
        result["top_hit"].append(int(order[np.flatnonzero(row[order] == best)[0]]))
    return result


def rank_of(row: np.ndarray, document: int, order: np.ndarray) -> int:
    """1-based rank of `document` among the row's scores, ties broken by id (`order`: the columns in id order)."""
    score = row[document]
    tied_before = np.flatnonzero(row[order] == score)
    position = int(np.flatnonzero(order[tied_before] == document)[0])
    return int(np.sum(row > score)) + position + 1


def relevance_threshold(data: PairData) -> float:
    """For scored pairs: the score from which an eval pair counts as relevant, the middle of the training scores."""
    scores = data.train["score"]
    return round((min(scores) + max(scores)) / 2, 6)


def write_retrieval_predictions(run_dir: Path, before: dict, after: dict) -> dict:
    """predictions.jsonl (each query, its positive, the rank of its positive before and after, its top hit after)
    and the report's section; the per-query records are taken out of the two score dicts (metrics.json keeps the
    figures)."""
    first, last = before.pop("per_query"), after.pop("per_query")
    rows = [{"query": query, "positive": positive, "rank_before": rank_before, "rank": rank, "top_hit": hit}
            for query, positive, rank_before, rank, hit in zip(last["query"], last["positive"], first["rank"],
                                                               last["rank"], last["top_hit"], strict=True)]
    if is_main_process():  # one run, one folder: rank 0 writes it
        write_jsonl_atomic(run_dir / "predictions.jsonl", rows)
    shown = rows[:SHOWN_PREDICTIONS]
    cells = "".join(f"<tr><td>{html.escape(row['query'][:200])}</td><td>{row['rank_before']}</td>"
                    f"<td>{row['rank']}</td><td>{html.escape(row['top_hit'][:200])}</td></tr>" for row in shown)
    section = (f"<p>Each of the {len(rows)} held-out queries searched all {last['documents']} held-out positives by "
               f"similarity; its own positive is the text to find (recall@k: found in the top k; MRR@10: 1 / its "
               f"rank, 0 beyond 10; nDCG@10: 1 / log2(rank + 1), 0 beyond 10). The first {len(shown)} queries (all "
               f"are in predictions.jsonl):</p><table><tr><th>query</th><th>rank before</th><th>rank after</th>"
               f"<th>top hit after</th></tr>{cells}</table>")
    return {"html": section, "queries": len(rows), "documents": last["documents"]}


# Exports: a sentence-transformers folder (hf) or one ONNX graph of the sentence embedding (onnx) ------------------
