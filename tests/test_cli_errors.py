"""User errors in the `tunelab` CLI: exit code 2, one `error:` line naming the culprit, and no run folder touched.

Every case fails before any model weights load: the data and the offline alias `minilm` are only located, never
read into a model. As a guard, training itself is patched to fail loudly should a case ever get that far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main

TRAIN_ROWS = [("good film", "pos"), ("great plot", "pos"), ("loved it", "pos"),
              ("bad film", "neg"), ("dull plot", "neg"), ("hated it", "neg")]
TEST_ROWS = [("fine film", "pos"), ("nice acting", "pos"), ("awful", "neg"), ("boring", "neg")]

# Relative paths resolve against tmp_path: every test runs there (see the `workspace` fixture).
BASE_RECIPE = {"task": "classify", "model": {"name": "minilm"}, "data": {"source": "./data"}}
DROP = object()  # in a recipe patch: remove this key

OLD_RUN_RECIPE = yaml.safe_dump({**BASE_RECIPE, "name": "old_run", "train": {"epochs": 1}}, sort_keys=False)
OLD_RUN_METRICS = json.dumps({"before": {"accuracy": 0.5, "macro_f1": 0.33},
                              "after": {"accuracy": 1.0, "macro_f1": 1.0}}, indent=2)


def jsonl(rows, text_key: str = "text", label_key: str = "label") -> str:
    """JSONL text for (text, label) rows."""
    return "".join(json.dumps({text_key: text, label_key: label}) + "\n" for text, label in rows)


GOOD_FILES = {"data/train.jsonl": jsonl(TRAIN_ROWS), "data/test.jsonl": jsonl(TEST_ROWS)}


def patched(base: dict, patch: dict) -> dict:
    """`base` with `patch` merged in, section by section; DROP removes a key."""
    merged = dict(base)
    for key, value in patch.items():
        if value is DROP:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = patched(merged[key], value)
        else:
            merged[key] = value
    return merged


def tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (relative path → content, mtime), and every folder (→ None)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


class Workspace:
    """tmp_path laid out as a user's project: data/, a finished run folder old_run/, an unfinished one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.old_run = root / "old_run"
        self.unfinished_run = root / "unfinished_run"
        self.new_run = root / "new_run"
        self.recipe = root / "recipe.yaml"
        self.old_run.mkdir()
        (self.old_run / "recipe.yaml").write_text(OLD_RUN_RECIPE)
        (self.old_run / "metrics.json").write_text(OLD_RUN_METRICS)
        self.unfinished_run.mkdir()
        (self.unfinished_run / "recipe.yaml").write_text(OLD_RUN_RECIPE)
        (self.unfinished_run / "log.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
        self.write_files(GOOD_FILES)

    def write_files(self, files: dict[str, str | bytes | None]) -> None:
        """Write (or, for None, delete) files relative to the workspace."""
        for name, content in files.items():
            path = self.root / name
            if content is None:
                path.unlink(missing_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")

    def write_recipe(self, recipe: dict | str | None) -> Path:
        """A recipe patch on BASE_RECIPE, raw YAML text, or None for no recipe file at all."""
        if isinstance(recipe, dict):
            self.recipe.write_text(yaml.safe_dump(patched(BASE_RECIPE, recipe), sort_keys=False))
        elif isinstance(recipe, str):
            self.recipe.write_text(recipe)
        return self.recipe

    def fail(self, capsys, argv: list[str]) -> str:
        """Run the CLI expecting a user error; check the contract and that nothing was written; return the line."""
        old_run_before = tree(self.old_run)
        everything_before = tree(self.root)
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2, f"exit code {code}; stdout: {out!r}; stderr: {err!r}"
        lines = err.splitlines()
        assert len(lines) == 1, f"expected exactly one stderr line, got {lines!r}"
        assert lines[0].startswith("error: ") and lines[0].removeprefix("error: ").strip(), lines
        assert "tunelab: run folder" not in out
        assert sorted(p.name for p in self.old_run.iterdir()) == ["metrics.json", "recipe.yaml"]
        assert tree(self.old_run) == old_run_before, "the existing run folder was modified"
        assert not self.new_run.exists(), "a new run folder was created for a refused run"
        assert tree(self.root) == everything_before, "the failed command wrote files"
        return lines[0]


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Workspace:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNELAB_DATA_PATH", str(tmp_path / "hub"))  # an empty search path: no shared data involved
    return Workspace(tmp_path)


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A case that wrongly got past validation must fail here, not spend minutes training."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started: the bad input was not refused up front")

    from tunelab.stages import classify

    monkeypatch.setattr(classify, "run_classification", refuse)  # the registry looks the stage up at run time


def assert_mentions(line: str, expected: list[str]) -> None:
    for fragment in expected:
        assert fragment in line, f"{fragment!r} not in {line!r}"


# (recipe, files, overrides, expected fragments of the error line)
# recipe: a patch on BASE_RECIPE, raw YAML text, or None (no recipe file); files: written over GOOD_FILES.
TRAIN_CASES = [
    # --- the recipe file
    pytest.param(None, {}, [], ["recipe file", "recipe.yaml' does not exist"],
                 id="missing-recipe-file-names-the-path"),
    pytest.param("task: classify\nmodel:\n  name: [minilm\ndata: {source: ./data}\n", {}, [],
                 ["not valid YAML", "at line 4"], id="invalid-yaml-names-the-line"),
    pytest.param("- task: classify\n- model: minilm\n", {}, [], ["must be a mapping of sections", "not a list"],
                 id="top-level-list-is-not-a-mapping"),
    pytest.param("", {}, [], ["'task' is required", "'model' is required", "'data' is required"],
                 id="empty-recipe-names-the-required-sections"),
    # --- the recipe schema
    pytest.param({"epochs": 3}, {}, [],
                 ["unknown key 'epochs'",
                  "valid keys here: name, task, model, data, method, train, eval, fewshot, preference, reward, grpo, "
                  "embed, output"],
                 id="unknown-top-level-key-lists-valid-keys"),
    pytest.param({"train": {"epoch": 3}}, {}, [],
                 ["unknown key 'train.epoch'", "valid keys here: epochs, max_steps, learning_rate"],
                 id="unknown-section-key-lists-valid-keys"),
    pytest.param({"data": {"colum": "text"}}, {}, [], ["unknown key 'data.colum'", "source, text, text_pair, label"],
                 id="unknown-data-key-lists-valid-keys"),
    pytest.param({"train": {"epochs": "many"}}, {}, [], ["'train.epochs' = 'many' is invalid", "number"],
                 id="wrong-type-names-field-and-value"),
    pytest.param({"train": {"batch_size": 0}}, {}, [], ["'train.batch_size' = 0 is invalid", "greater than"],
                 id="out-of-range-value-names-field-and-value"),
    pytest.param({"model": DROP}, {}, [], ["'model' is required"], id="missing-model-section"),
    pytest.param({"data": {"source": DROP}}, {}, [], ["'data.source' is required"], id="missing-data-source"),
    pytest.param({"method": "lorax"}, {}, [], ["'method.name' must be one of full, freeze, lora", "(got 'lorax')"],
                 id="unknown-method-lists-methods"),
    pytest.param({"method": {"name": "lora", "r": 0}}, {}, [], ["'method.r' = 0 is invalid"],
                 id="bad-method-option-names-method-field"),
    pytest.param({"method": {"name": "freeze", "r": 8}}, {}, [],
                 ["unknown key 'method.r'", "valid keys here: name, train_top_layers"],
                 id="option-of-another-method-lists-valid-keys"),
    pytest.param({"task": "regress"}, {}, [], ["'task' = 'regress' is invalid", "'classify'"],
                 id="unknown-task-names-the-task"),
    # --- overrides
    pytest.param({}, {}, ["epochs"], ["override 'epochs' is not of the form dotted.key=value"],
                 id="override-without-equals-sign"),
    pytest.param({}, {}, ["=3"], ["override '=3' is not of the form dotted.key=value"],
                 id="override-without-key"),
    pytest.param({}, {}, ["train.epoch=2"], ["unknown key 'train.epoch'", "valid keys here: epochs"],
                 id="override-of-unknown-key-lists-valid-keys"),
    pytest.param({}, {}, ["model.name.revision=main"], ["override 'model.name.revision=main'", "'name' is a value"],
                 id="override-descending-into-a-value"),
    pytest.param({}, {}, ["train.epochs=many"], ["'train.epochs' = 'many' is invalid"],
                 id="override-with-wrong-type"),
    # --- data files and folders
    pytest.param({"data": {"source": "./missing.jsonl"}}, {}, [],
                 ["data.source './missing.jsonl' does not exist"], id="missing-data-file"),
    pytest.param({"data": {"source": "./missing_folder/"}}, {}, [],
                 ["data.source './missing_folder/' does not exist"], id="missing-data-folder"),
    pytest.param({"data": {"source": "./sheet.xlsx"}}, {"sheet.xlsx": b"PK\x03\x04 not really a workbook"}, [],
                 ["sheet.xlsx' has an unsupported format", ".csv, .json, .jsonl, .parquet, .tsv"],
                 id="unsupported-xlsx-format-lists-formats"),
    pytest.param({}, {"data/train.jsonl": '{"text": "good film", "label": "pos"}\n{"text": oops\n'}, [],
                 ["cannot read data file", "train.jsonl' as json"], id="corrupt-jsonl-names-the-file"),
    pytest.param({"data": {"source": "./broken.csv"}}, {"broken.csv": 'text,label\n"unclosed,pos\n'}, [],
                 ["cannot read data file", "broken.csv' as csv"], id="corrupt-csv-names-the-file"),
    pytest.param({}, {"data/test.jsonl": ""}, [], ["test.jsonl"], id="empty-split-file-names-the-file"),
    pytest.param({}, {"data/train.jsonl": None, "data/test.jsonl": None, "data/notes.txt": "hi"}, [],
                 ["has no train.*/test.*/validation.* file", "it holds: notes.txt"],
                 id="folder-without-split-files-lists-its-files"),
    pytest.param({"data": {"train_split": "training"}}, {}, [],
                 ["data.train_split 'training'", "splits: train, test"], id="unknown-train-split-lists-splits"),
    pytest.param({"data": {"eval_split": "validation"}}, {}, [],
                 ["data.eval_split 'validation'", "splits: train, test"], id="unknown-eval-split-lists-splits"),
    # --- columns and rows
    pytest.param({"data": {"text": "sentence"}}, {}, [],
                 ["data.text column 'sentence'", "(columns: text, label)"], id="missing-text-column-lists-columns"),
    pytest.param({"data": {"label": "category"}}, {}, [],
                 ["data.label column 'category'", "(columns: text, label)"], id="missing-label-column-lists-columns"),
    pytest.param({"data": {"text_pair": "hypothesis"}}, {}, [],
                 ["data.text_pair column 'hypothesis'", "(columns: text, label)"],
                 id="missing-text-pair-column-lists-columns"),
    pytest.param({"data": {"source": "./reviews.csv", "text": "review"}},
                 {"reviews.csv": "body,stars,label\ngood,5,pos\nbad,1,neg\n"}, [],
                 ["data.text column 'review'", "(columns: body, stars, label)"],
                 id="missing-csv-column-lists-csv-columns"),
    pytest.param({}, {"data/train.jsonl": jsonl(TRAIN_ROWS + [("", "pos"), ("   ", "neg")])}, [],
                 ["2 of 8 rows in split 'train' have an empty text or label", "data.drop_empty"],
                 id="empty-texts-counted-and-drop-empty-suggested"),
    pytest.param({}, {"data/train.jsonl": jsonl(TRAIN_ROWS) + '{"text": null, "label": "pos"}\n'}, [],
                 ["1 of 7 rows in split 'train'"], id="null-text-counted-as-empty"),
    pytest.param({}, {"data/test.jsonl": jsonl(TEST_ROWS + [("so-so", None)])}, [],
                 ["1 of 5 rows in split 'test' have an empty text or label"], id="missing-eval-label-counted"),
    pytest.param({"data": {"drop_empty": True}}, {"data/test.jsonl": jsonl([("", "pos"), (" ", "neg")])}, [],
                 ["split 'test' has no rows left after dropping 2 empty ones"], id="drop-empty-leaving-no-rows"),
    # --- labels
    pytest.param({"data": {"labels": ["neg", "pos", "meh"]}}, {"data/test.jsonl": jsonl(TEST_ROWS + [("ok", "meh")])},
                 [], ["eval split 'test' has labels never seen in training: meh"],
                 id="eval-label-unseen-in-training-named"),
    pytest.param({}, {"data/test.jsonl": jsonl(TEST_ROWS + [("ok", "meh")])}, [], ["split 'test'", "'meh'"],
                 id="eval-label-outside-training-labels-named"),
    pytest.param({}, {"data/train.jsonl": jsonl([(text, "pos") for text, _ in TRAIN_ROWS]),
                      "data/test.jsonl": jsonl([(text, "pos") for text, _ in TEST_ROWS])}, [],
                 ["the training split has a single class ('pos')"], id="single-class-in-train"),
    pytest.param({"data": {"labels": ["pos"]}}, {}, [], ["split 'train' has labels not in data.labels ('neg')"],
                 id="given-labels-not-covering-the-data"),
    pytest.param({"data": {"labels": ["neg", "pos"]}},
                 {"data/train.jsonl": jsonl([(t, i % 3) for i, (t, _) in enumerate(TRAIN_ROWS)]),
                  "data/test.jsonl": jsonl([(t, i % 2) for i, (t, _) in enumerate(TEST_ROWS)])}, [],
                 ["split 'train' has labels not in data.labels (2)"], id="integer-label-beyond-given-labels"),
    # --- the model
    pytest.param({"model": {"name": "./models/does-not-exist"}}, {}, [],
                 ["model.name './models/does-not-exist' does not exist", "minilm"],
                 id="missing-local-model-path-lists-aliases"),
    pytest.param({"model": {"name": "./models/weights.gguf"}}, {}, [],
                 ["model.name './models/weights.gguf' does not exist"], id="missing-gguf-file"),
    pytest.param({"model": {"name": "./not_a_model"}}, {"not_a_model/README.md": "notes"}, [],
                 ["model.name folder './not_a_model' holds no config.json"], id="model-folder-without-config"),
]


@pytest.mark.parametrize(("recipe", "files", "overrides", "expected"), TRAIN_CASES)
def test_train_refuses_bad_input_with_one_error_line_and_writes_no_run_folder(
        workspace, capsys, recipe, files, overrides, expected):
    workspace.write_files(files)
    recipe_path = workspace.write_recipe(recipe)
    line = workspace.fail(capsys, ["train", str(recipe_path), *overrides, "--output", str(workspace.new_run)])
    assert_mentions(line, expected)


@pytest.mark.parametrize(("recipe", "files", "overrides", "expected"), [
    pytest.param({"data": {"text": "sentence"}}, {}, [], ["data.text column 'sentence'", "(columns: text, label)"],
                 id="missing-text-column"),
    pytest.param({}, {"data/train.jsonl": jsonl(TRAIN_ROWS + [("", "pos"), ("   ", "neg")])}, [],
                 ["2 of 8 rows in split 'train'"], id="empty-texts"),
    pytest.param({}, {}, ["train.epoch=2"], ["unknown key 'train.epoch'"], id="override-of-unknown-key"),
    pytest.param({"model": {"name": "./models/does-not-exist"}}, {}, [], ["'./models/does-not-exist' does not exist"],
                 id="missing-local-model-path"),
])
def test_validate_refuses_the_same_bad_input(workspace, capsys, recipe, files, overrides, expected):
    workspace.write_files(files)
    line = workspace.fail(capsys, ["validate", str(workspace.write_recipe(recipe)), *overrides])
    assert_mentions(line, expected)


def test_validate_accepts_empty_texts_with_drop_empty(workspace, capsys):
    workspace.write_files({"data/train.jsonl": jsonl(TRAIN_ROWS + [("", "pos"), ("   ", "neg")])})
    recipe = workspace.write_recipe({"data": {"drop_empty": True}})

    assert main(["validate", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert "# ok: 6 train rows, 4 eval rows (test), 2 labels" in out
    assert "drop_empty: true" in out
    assert "error" not in err
    assert not workspace.new_run.exists()


def test_validate_accepts_drop_empty_given_as_override(workspace, capsys):
    workspace.write_files({"data/train.jsonl": jsonl(TRAIN_ROWS + [("", "pos"), ("   ", "neg")])})
    recipe = workspace.write_recipe({})

    assert main(["validate", str(recipe), "data.drop_empty=true"]) == 0
    assert "# ok: 6 train rows" in capsys.readouterr().out


# --- run folders: an existing one is never written to, a refused run creates none


def test_train_refuses_an_existing_output_folder_and_leaves_it_untouched(workspace, capsys):
    recipe = workspace.write_recipe({})
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.old_run)])
    assert_mentions(line, [f"output folder '{workspace.old_run}' already exists", "--resume"])


def test_train_refuses_an_existing_unfinished_output_folder_without_resume(workspace, capsys):
    recipe = workspace.write_recipe({})
    before = tree(workspace.unfinished_run)
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.unfinished_run)])
    assert_mentions(line, ["unfinished_run' already exists"])
    assert tree(workspace.unfinished_run) == before


def test_train_resume_without_output_is_refused_and_creates_no_default_run_folder(workspace, capsys):
    recipe = workspace.write_recipe({})
    line = workspace.fail(capsys, ["train", str(recipe), "--resume"])
    assert_mentions(line, ["--resume needs --output RUN_DIR"])
    assert not (workspace.root / "runs").exists()


def test_train_resume_of_a_finished_run_is_refused(workspace, capsys):
    recipe = workspace.write_recipe({})
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.old_run), "--resume"])
    assert_mentions(line, [f"cannot resume '{workspace.old_run}'", "already finished"])


def test_train_resume_of_a_missing_folder_is_refused_and_does_not_create_it(workspace, capsys):
    recipe = workspace.write_recipe({})
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.new_run), "--resume"])
    assert_mentions(line, [f"cannot resume '{workspace.new_run}'", "no recipe.yaml"])


def test_train_resume_with_a_different_recipe_is_refused_and_leaves_the_run_untouched(workspace, capsys):
    recipe = workspace.write_recipe({"train": {"epochs": 2}})
    before = tree(workspace.unfinished_run)
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.unfinished_run), "--resume"])
    assert_mentions(line, ["cannot resume", "the recipe differs", "unfinished_run/recipe.yaml"])
    assert tree(workspace.unfinished_run) == before


def test_train_checks_the_data_before_refusing_an_existing_output(workspace, capsys):
    """The first problem reported is the recipe's, so fixing it never reveals a second, unrelated error late."""
    recipe = workspace.write_recipe({"data": {"text": "sentence"}})
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.old_run)])
    assert_mentions(line, ["data.text column 'sentence'"])


# --- eval and predict: refused before any model loads


@pytest.mark.parametrize(("argv", "files", "expected"), [
    pytest.param(["predict", "./old_run"], {}, ["predict needs texts"], id="predict-without-texts"),
    pytest.param(["predict", "./old_run", "--file", "./rows.jsonl"], {}, ["--file 'rows.jsonl' does not exist"],
                 id="predict-file-missing"),
    pytest.param(["predict", "./old_run", "--file", "./rows.jsonl"], {"rows.jsonl": '{"text": "a"}\n{"body": "b"}\n'},
                 ["line 2 is not a JSON object with field 'text'"], id="predict-file-row-without-field"),
    pytest.param(["predict", "./old_run", "--file", "./rows.jsonl", "--field", "body"],
                 {"rows.jsonl": '{"body": "a"}\nnot json\n'}, ["line 2", "field 'body'"],
                 id="predict-file-line-not-json"),
    pytest.param(["predict", "./no_such_run", "great film"], {}, ["'no_such_run' is not a trained model"],
                 id="predict-with-missing-model-folder"),
    pytest.param(["predict", "./old_run", "great film"], {}, ["old_run/model' is not a trained model"],
                 id="predict-with-run-folder-without-model"),
    pytest.param(["eval", "./no_such_run", "--data", "./data"], {}, ["'no_such_run' is not a trained model"],
                 id="eval-with-missing-model-folder"),
    pytest.param(["eval", "./old_run", "--data", "./data"], {}, ["old_run/model' is not a trained model"],
                 id="eval-with-run-folder-without-model"),
])
def test_eval_and_predict_refuse_bad_use_with_one_error_line(workspace, capsys, argv, files, expected):
    workspace.write_files(files)
    line = workspace.fail(capsys, argv)
    assert_mentions(line, expected)


# --- contracts that once broke: each is a regression test


def test_override_without_equals_sign_after_an_option_prints_one_error_line(workspace, capsys):
    recipe = workspace.write_recipe({})
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.new_run), "epochs"])
    assert_mentions(line, ["epochs"])


def test_predict_accepts_texts_after_an_option(workspace, capsys):
    line = workspace.fail(capsys, ["predict", "./no_such_run", "--top-k", "2", "great film"])
    assert_mentions(line, ["'no_such_run' is not a trained model"])


def test_eval_with_size_zero_prints_one_error_line(workspace, capsys):
    line = workspace.fail(capsys, ["eval", "./old_run", "--data", "./data", "--size", "0"])
    assert_mentions(line, ["size"])


def test_eval_on_a_folder_with_a_foreign_recipe_prints_one_error_line(workspace, capsys):
    workspace.write_files({"notes/recipe.yaml": "just: notes\n"})
    line = workspace.fail(capsys, ["eval", "./notes", "--data", "./data"])
    assert_mentions(line, ["notes/model' is not a trained model"])


def test_eval_label_unseen_in_training_is_not_blamed_on_data_labels_when_none_given(workspace, capsys):
    workspace.write_files({"data/test.jsonl": jsonl(TEST_ROWS + [("ok", "meh")])})
    recipe = workspace.write_recipe({})
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.new_run)])
    assert "data.labels" not in line


def test_empty_split_file_is_reported_as_empty(workspace, capsys):
    workspace.write_files({"data/test.jsonl": ""})
    recipe = workspace.write_recipe({})
    line = workspace.fail(capsys, ["train", str(recipe), "--output", str(workspace.new_run)])
    assert "empty" in line


def test_corrupt_jsonl_prints_only_the_error_line_in_a_real_process(workspace):
    workspace.write_files({"data/train.jsonl": '{"text": "good film", "label": "pos"}\n{"text": oops\n'})
    recipe = workspace.write_recipe({})
    result = subprocess.run([sys.executable, "-m", "tunelab", "validate", str(recipe)], capture_output=True,
                            text=True, cwd=workspace.root, env={**os.environ, "TUNELAB_DATA_PATH": ""}, timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: cannot read data file")
