"""ONNX Runtime against PyTorch on CPU: a classifier run and its `tunelab export --format onnx` folder, scored on the
same rows, in the same batches, with the same number of threads. Prints agreement and a rows/s table.

    PYTHONPATH=src TUNELAB_DATA_PATH=../shared/data .venv/bin/python benchmarks/onnx_inference.py \
        --run runs/minilm-full [--export DIR] [--threads 1] [--batch-size 32] [--repeats 5]

Without --export the run is exported into a temporary folder first. Rows: the test split of the run's data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def score_rows(trained, texts: list[str], batch_size: int) -> np.ndarray:
    """Class probabilities of every text, in batches of `batch_size` (batched by length inside each loader)."""
    return trained.probabilities(texts, batch_size=batch_size) if hasattr(trained, "session") else \
        torch_probabilities(trained, texts, batch_size)


def torch_probabilities(trained, texts: list[str], batch_size: int) -> np.ndarray:
    """The PyTorch path of `tunelab predict` (fp32), with the batch size under test."""
    from tunelab.evaluation.classification import predict_probabilities

    max_length = (trained.recipe or {}).get("model", {}).get("max_length", 256)
    return predict_probabilities(trained.model, trained.tokenizer, texts, batch_size=batch_size,
                                 max_length=max_length)


def rows_per_second(runtimes: dict, texts: list[str], batch_size: int, repeats: int) -> dict[str, list[float]]:
    """rows/s of every timed pass of each runtime (after one warm-up pass each). The runtimes take turns pass by
    pass, so load from other jobs on a shared machine falls on both alike."""
    for trained in runtimes.values():
        score_rows(trained, texts[:batch_size], batch_size)
    speeds: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(repeats):
        for name, trained in runtimes.items():
            start = time.perf_counter()
            score_rows(trained, texts, batch_size)
            speeds[name].append(len(texts) / (time.perf_counter() - start))
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="finished classify run folder (encoder)")
    parser.add_argument("--export", type=Path, help="its --format onnx export (default: exported now)")
    parser.add_argument("--threads", type=int, default=1, help="threads for both runtimes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over all rows (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the ONNX loader gives ONNX Runtime torch's thread count

    from tunelab import api
    from tunelab.data.labelled import load_eval_split
    from tunelab.inference.trained import load_trained
    from tunelab.recipe import DataConfig

    export = args.export or api.export(str(args.run), str(Path(tempfile.mkdtemp()) / "onnx"), "onnx")
    pytorch, onnx = load_trained(args.run), load_trained(export)
    recipe_data = pytorch.recipe["data"]
    data = DataConfig(source=recipe_data["source"], text=recipe_data["text"], label=recipe_data["label"])
    rows = load_eval_split(data, recipe_data.get("eval_split") or "test", pytorch.labels)
    texts = list(rows["text"])
    want, got = score_rows(pytorch, texts, args.batch_size), score_rows(onnx, texts, args.batch_size)
    saved = [json.loads(line)["predicted"] for line in (args.run / "predictions.jsonl").read_text().splitlines()]
    onnx_labels = [onnx.labels[i] for i in got.argmax(-1)]
    agreement = {
        "rows": len(texts),
        "onnx_equals_pytorch_predictions": int(sum(a == b for a, b in zip(got.argmax(-1), want.argmax(-1),
                                                                           strict=True))),
        "onnx_equals_run_predictions_jsonl": int(sum(a == b for a, b in zip(onnx_labels, saved, strict=True))),
        "max_abs_probability_diff": float(np.abs(got - want).max()),
        "onnx_accuracy": float(np.mean(got.argmax(-1) == np.array(rows["label"]))),
    }
    print(json.dumps(agreement, indent=2))
    import onnxruntime

    speeds = rows_per_second({"pytorch": pytorch, "onnx": onnx}, texts, args.batch_size, args.repeats)
    torch_speed, onnx_speed = statistics.median(speeds["pytorch"]), statistics.median(speeds["onnx"])
    print(f"\n{len(texts)} rows, batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats} passes "
          f"(the two runtimes take turns)")
    print("| runtime | rows/s | passes (rows/s) |\n|---|---|---|")
    for name, label, speed in [("pytorch", f"PyTorch {torch.__version__} (fp32)", torch_speed),
                               ("onnx", f"ONNX Runtime {onnxruntime.__version__}", onnx_speed)]:
        print(f"| {label} | {speed:.1f} | {', '.join(f'{s:.0f}' for s in speeds[name])} |")
    print(f"\nONNX Runtime / PyTorch: {onnx_speed / torch_speed:.2f}x")

if __name__ == "__main__":
    main()
