"""Export a finished run to the formats people run models in: a plain Hugging Face folder (hf), one llama.cpp /
Ollama file (gguf), or an ONNX Runtime graph (onnx). One module per format; run.py holds what they share."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError

FORMATS = ("hf", "gguf", "onnx")


def export_run(run_dir: str | Path, output: str | Path, fmt: str = "hf", quantize: str | None = None,
               verify: bool = False, verify_size: int | None = None) -> Path:
    """Write `run_dir`'s model to the new folder `output` in format `fmt`; return the folder.

    Everything is checked before the model loads, and the folder appears only once complete (staged, renamed).
    With `verify`, the published export is then scored against the run on its eval split (its first `verify_size`
    rows): verify.json and the model card's "Verified" section (export/verify.py).
    """
    from tunelab.export.run import check_format, check_mergeable, check_new_output
    from tunelab.export.verify import check_verifiable, verify_export
    from tunelab.runs.folder import finished_run

    if fmt not in FORMATS:
        raise TunelabError(f"export: --format '{fmt}' is not one of {', '.join(FORMATS)}")
    if quantize is not None and fmt != "gguf":
        raise TunelabError(f"export: --quantize applies to --format gguf only; drop it for --format {fmt}")
    output = check_new_output(output)
    run = finished_run(run_dir, "export")
    check_format(run, fmt)
    check_mergeable(run)
    if verify:
        check_verifiable(run)
    folder = write_export(run, output, fmt, quantize)
    if verify:
        verify_export(run.path, folder, verify_size)
    return folder


def write_export(run, output: Path, fmt: str, quantize: str | None) -> Path:
    """The export itself, in one format (the checks common to all formats are done)."""
    from tunelab.export.run import load_merged, publish_folder

    if run.task.embeds:  # a sentence encoder: its embedding is the output, there is no task head to write
        from tunelab.export.embeddings import write_embeddings

        return publish_folder(output, lambda folder: write_embeddings(run, folder, fmt))
    if fmt == "gguf":
        from tunelab.export.gguf import check_gguf_exportable, write_gguf

        quantize = check_gguf_exportable(run, quantize)
        model, tokenizer = load_merged(run)
        return publish_folder(output, lambda folder: write_gguf(run, model, tokenizer, folder, quantize))
    if fmt == "onnx":
        from tunelab.export.onnx import check_onnx_exportable, write_onnx

        check_onnx_exportable(run)
        model, tokenizer = load_merged(run)
        return publish_folder(output, lambda folder: write_onnx(run, model, tokenizer, folder))
    from tunelab.export.hf import write_hf

    model, tokenizer = load_merged(run)
    return publish_folder(output, lambda folder: write_hf(run, model, tokenizer, folder))
