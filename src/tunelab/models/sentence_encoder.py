"""Sentence encoders: loaded for embedding training (task embed), and as a SetFit model (sentence-transformers body +
sklearn head) for few-shot classification.

SetFit 1.2 works with the installed transformers 5.x / sentence-transformers 6, so tunelab uses it rather than
re-implementing its pair sampling and contrastive loss.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError, one_line

HEAD_FILE = "model_head.pkl"  # where SetFit saves the fitted head (joblib)


def quiet_setfit() -> None:
    """SetFit switches its own logger to INFO on import; keep tunelab's output to its own lines and the bar."""
    import setfit

    setfit.logging.set_verbosity_warning()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)


def load_sentence_encoder(location: str, max_length: int, task: str = "fewshot"):
    """The SentenceTransformer at `location` (mean pooling is added to a plain transformer), reading at most
    `max_length` tokens; a folder that is no sentence encoder is refused in one line naming `task`."""
    from sentence_transformers import SentenceTransformer

    quiet_setfit()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Nn]o sentence-transformers model found.*")
            encoder = SentenceTransformer(location)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"model '{location}' cannot be loaded as a sentence encoder: {one_line(exc, 200)}") from None
    if encoder.tokenizer.pad_token is None:
        raise TunelabError(f"model '{location}' has no padding token, so it is not a sentence encoder; task {task} "
                           f"needs an encoder such as minilm or mpnet-base")
    encoder.max_seq_length = max_length
    return encoder


def load_setfit_model(location: str, labels: list[str], max_length: int, head_c: float, seed: int):
    """A SetFit model: the encoder at `location` (mean pooling is added to a plain transformer) + an unfit head."""
    from setfit import SetFitModel
    from sklearn.linear_model import LogisticRegression

    body = load_sentence_encoder(location, max_length)
    head = LogisticRegression(C=head_c, max_iter=1000, random_state=seed)
    return SetFitModel(model_body=body, model_head=head, labels=list(labels))


def load_trained_setfit(path: Path):
    """A SetFit model saved by a fewshot run's model/ folder."""
    from setfit import SetFitModel

    quiet_setfit()
    if not (path / HEAD_FILE).is_file():
        raise TunelabError(f"'{path}' holds no {HEAD_FILE}: not a few-shot model saved by tunelab")
    return SetFitModel.from_pretrained(str(path))


def setfit_probabilities(model, texts: list[str], label_count: int, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (rows in input order, one column per label) from a fitted SetFit model.

    The sklearn head only has columns for the classes it saw while fitting; they are put in their label's column.
    """
    fitted = model.predict_proba(list(texts), batch_size=batch_size, as_numpy=True, show_progress_bar=False)
    probabilities = np.zeros((len(texts), label_count), dtype=np.float32)
    probabilities[:, np.asarray(model.model_head.classes_, dtype=int)] = fitted
    return probabilities


def head_parameter_count(model) -> int:
    """Weights and biases of the fitted logistic-regression head."""
    head = model.model_head
    return int(head.coef_.size + head.intercept_.size) if hasattr(head, "coef_") else 0

