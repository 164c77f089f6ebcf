// New-run page: a form built from the recipe schema; Validate and Start go through tunelab's own checks.
"use strict";
navigation("/new");
let schema = null, values = {}, startedRun = null;

function fieldId(path) { return "f-" + path.replace(/\./g, "-"); }

// A field's row; values may come from an earlier run's recipe.yaml (untrusted), so they go in as text and properties.
function fieldNode(field) {
  const value = values[field.path] ?? field.default;
  const id = fieldId(field.path);
  let input;
  if (field.kind === "choice" || field.kind === "bool") {
    const choices = field.kind === "bool" ? ["true", "false"] : field.choices;
    input = el("select", {id, name: field.path}, choices.map(c => el("option", {selected: c === value}, c)));
  } else {
    input = el("input", {id, name: field.path, size: 28,
                         placeholder: field.required ? "required" : "default: " + (field.default || "none")});
    input.value = value ?? "";
  }
  return el("div", {class: "field", "data-path": field.path}, el("label", {for: id}, field.path),
    el("div", {}, input, el("div", {class: "error", id: `error-${id}`})),
    el("div", {class: "help"}, field.description + (field.default && !field.required ? ` (default ${field.default})` : "")));
}

// The sections every task shares, then the chosen task's own (e.g. preference for dpo); the chosen method's fields.
function renderForm() {
  const method = values["method.name"] || "full";
  const task = values["task"] || "classify";
  const sections = schema.sections.flatMap(s => s.name === "output" ? [...(schema.tasks[task] || []), s] : [s]);
  document.getElementById("form").replaceChildren(...sections.map(section => {
    const fields = section.fields.map(fieldNode);
    if (section.name === "method") fields.push(...(schema.methods[method] || []).map(fieldNode));
    return el("fieldset", {}, el("legend", {}, section.title),
      section.description ? el("p", {class: "help"}, section.description) : null, fields);
  }));
  for (const path of ["method.name", "task"]) {
    document.getElementById(fieldId(path)).addEventListener("change", () => {
      values = collect();
      renderForm();
    });
  }
}

function collect() {
  const collected = {};
  document.querySelectorAll("#form [name]").forEach(input => { collected[input.name] = input.value; });
  return collected;
}

function showResult(result) {
  document.querySelectorAll(".field").forEach(f => f.classList.remove("invalid"));
  document.querySelectorAll(".field .error").forEach(e => { e.textContent = ""; });
  const out = document.getElementById("result");
  if (result.ok) {
    out.className = "";
    out.textContent = "ok: " + result.summary;
    return;
  }
  const box = result.field && document.getElementById("error-" + fieldId(result.field));
  if (box) {
    box.textContent = result.error;
    box.closest(".field").classList.add("invalid");
    box.scrollIntoView({block: "center"});
    out.className = "error";
    out.textContent = `error in ${result.field}`;
  } else {
    out.className = "error";
    out.textContent = result.error;
  }
}

async function send(url) {
  const out = document.getElementById("result");
  out.className = "";
  out.textContent = url.endsWith("start") ? "checking and starting…" : "checking…";
  try {
    const result = await postJSON(url, {values: collect()});
    showResult(result);
    if (result.ok && result.run) {
      startedRun = result.run;
      out.replaceChildren("started: ", runLink(result.run), ` (${result.job.state})`);
      document.getElementById("stop").hidden = false;
    }
  } catch (error) {
    out.className = "error";
    out.textContent = error.message;
  }
}

async function loadTemplate() {
  const choice = document.getElementById("template").value;
  const colon = choice.indexOf(":");
  if (colon < 0) return;
  const kind = choice.slice(0, colon), name = choice.slice(colon + 1);
  try {
    values = (await getJSON(`/api/form/values?kind=${encodeURIComponent(kind)}&name=${encodeURIComponent(name)}`)).values;
    renderForm();
    document.getElementById("result").textContent = "";
  } catch (error) {
    document.getElementById("result").textContent = error.message;
  }
}

async function init() {
  schema = await getJSON("/api/form");
  const preset = param("from");  // e.g. run:NAME or example:NAME
  document.getElementById("template").replaceChildren(el("option", {value: ""}, "(empty form)"),
    el("optgroup", {label: "examples"}, schema.examples.map(e => el("option", {value: `example:${e}`}, e))),
    el("optgroup", {label: "earlier runs"}, schema.runs.map(r => el("option", {value: `run:${r}`}, r))));
  renderForm();
  if (preset) {
    document.getElementById("template").value = preset;
    await loadTemplate();
  }
}

document.getElementById("load").addEventListener("click", loadTemplate);
document.getElementById("validate").addEventListener("click", () => send("/api/validate"));
document.getElementById("start").addEventListener("click", () => send("/api/start"));
document.getElementById("stop").addEventListener("click", async () => {
  try {
    await postJSON("/api/stop", {run: startedRun});
    document.getElementById("result").replaceChildren("stopped: ", runLink(startedRun), " (resume it from its page)");
  } catch (error) {
    document.getElementById("result").textContent = error.message;
  }
});
init();
