"""The README.md model card every export carries: where the model came from, how it was trained, what it scored
before and after, the resolved recipe that repeats the run, and how to load the exported files."""

from __future__ import annotations

import yaml

from tunelab.evaluation import HEADLINE_METRICS
from tunelab.runs.folder import RunFolder


def model_card(run: RunFolder, fmt: str, how_to_load: str, notes: list[str] | None = None) -> str:
    """README.md text for an export of `run` in format `fmt`; `how_to_load` is a fenced code snippet."""
    chain = [str(step) for step in run.metrics.get("chain") or [run.recipe.model.name]]
    task = run.recipe.task
    library = "sentence-transformers" if run.task.embeds else "transformers"
    front = {"base_model": chain[0], "library_name": library if fmt == "hf" else fmt,
             "pipeline_tag": run.task.pipeline_tag,
             "tags": ["tunelab", task, run.method], "datasets": [run.recipe.data.source]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {run.recipe.name} ({fmt} export)", "",
             f"Trained with tunelab: task **{task}**, method **{run.method}**, exported from run folder "
             f"`{run.path}`.", "",
             "| | |", "|---|---|",
             f"| base model and chain | {' → '.join(f'`{step}`' for step in chain)}{alias_note(chain[0])} |",
             f"| task / method | {task} / {run.method} |",
             f"| data | `{run.recipe.data.source}` ({run.metrics.get('train_rows', '?') or 'streamed'} train rows, "
             f"{run.metrics.get('eval_rows', '?')} eval rows, split `{run.metrics.get('eval_split', '?')}`) |"]
    if run.metrics.get("labels"):
        lines.append(f"| labels | {len(run.metrics['labels'])}: {', '.join(run.metrics['labels'])} |")
    if run.recipe.data.prompt_template:
        lines.append(f"| prompt format | `{run.recipe.data.prompt_template}` (put the text into this template"
                     f"{', then into the chat template as the user turn' if run.metrics.get('chat_template') else ''})"
                     f" |")
    lines += ["", "## Evaluation (same eval rows before and after training)", "", "| metric | before | after |",
              "|---|---|---|"]
    before, after = run.metrics.get("before") or {}, run.metrics.get("after") or {}
    for key in HEADLINE_METRICS:
        if isinstance(after.get(key), int | float):
            lines.append(f"| {key} | {format_number(before.get(key))} | {format_number(after[key])} |")
    lines += ["", "## How to load", "", how_to_load.strip(), ""]
    for note in notes or []:
        lines += [note, ""]
    lines += ["## Recipe (resolved: every default written out)", "", "```yaml",
              run.recipe.to_yaml().strip(), "```", ""]
    return "\n".join(lines)


def alias_note(name: str) -> str:
    """What a tunelab model alias stands for (the card is read where tunelab's aliases are unknown)."""
    from tunelab.models.aliases import OFFLINE_MODELS

    return f" (`{name}` = {OFFLINE_MODELS[name].description})" if name in OFFLINE_MODELS else ""


def format_number(value) -> str:
    """A metric for the table: four decimals, or a dash when missing."""
    return f"{value:.4f}" if isinstance(value, int | float) else "–"


VERIFIED_HEADING = "## Verified"


def verified_section(result: dict) -> str:
    """The card's "Verified" section: what `tunelab export --verify` measured (verify.json) as a table."""
    run, file, gain = result["run"], result["file"], result["difference"]
    lines = [VERIFIED_HEADING, "",
             f"`tunelab export --verify` scored {result['rows']} eval rows of the run through this file with "
             f"{result['runtime']}, and the same rows through the run's own model (paired 95% bootstrap intervals):",
             "", "| metric | run | file | file − run | rows answered differently | McNemar p |",
             "|---|---|---|---|---|---|",
             f"| {result['metric']} | {run['value']:.4f} [{run['low']:.3f}, {run['high']:.3f}] | {file['value']:.4f} "
             f"[{file['low']:.3f}, {file['high']:.3f}] | {gain['value']:+.4f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"
             f" | {1 - result['same_outputs']:.1%} | {result['p_value']:.3g} |", ""]
    checked = result.get("template_and_eos") or {}
    if checked.get("checked"):
        differ = "; ".join(checked.get("differ") or [])
        found = f"differ from the run's: {differ}" if differ else "match the run's tokenizer"
        lines += [f"The file's chat template and EOS {found}.", ""]
    lines += [f"**{line}**" for line in result.get("warnings") or []] + ([""] if result.get("warnings") else [])
    return "\n".join(lines)


def with_verified_section(card: str, result: dict) -> str:
    """The card with its "Verified" section put (or replaced) before the recipe, or at the end."""
    section = verified_section(result) + "\n"
    if VERIFIED_HEADING in card:
        start = card.index(VERIFIED_HEADING)
        following = card.find("\n## ", start + len(VERIFIED_HEADING))
        card = card[:start] + (card[following + 1:] if following >= 0 else "")
    recipe = card.find("## Recipe")
    return card[:recipe] + section + card[recipe:] if recipe >= 0 else card.rstrip("\n") + "\n\n" + section
