// New-run page: a form built from the recipe schema; Validate and Start go through tunelab's own checks.
"use strict";
navigation("/new");
let schema = null, values = {}, startedRun = null;

function fieldId(path) { return "f-" + path.replace(/\./g, "-"); }

function fieldHtml(field) {
  const value = values[field.path] ?? field.default;
  const id = fieldId(field.path);
  let input;
  if (field.kind === "choice" || field.kind === "bool") {
    const choices = field.kind === "bool" ? ["true", "false"] : field.choices;
    input = `<select id="${id}" name="${esc(field.path)}">` + choices.map(c =>
      `<option${c === value ? " selected" : ""}>${esc(c)}</option>`).join("") + `</select>`;
  } else {
    input = `<input id="${id}" name="${esc(field.path)}" value="${esc(value)}" size="28"`
          + ` placeholder="${field.required ? "required" : "default: " + esc(field.default || "none")}">`;
  }
  return `<div class="field" data-path="${esc(field.path)}"><label for="${id}">${esc(field.path)}</label>`
       + `<div>${input}<div class="error" id="error-${id}"></div></div>`
       + `<div class="help">${esc(field.description)}${field.default && !field.required ? ` (default ${esc(field.default)})` : ""}</div></div>`;
}

function renderForm() {
  const method = values["method.name"] || "full";
  document.getElementById("form").innerHTML = schema.sections.map(section => {
    let fields = section.fields.map(fieldHtml).join("");
    if (section.name === "method") fields += (schema.methods[method] || []).map(fieldHtml).join("");
    return `<fieldset><legend>${esc(section.title)}</legend>`
         + (section.description ? `<p class="help">${esc(section.description)}</p>` : "") + fields + `</fieldset>`;
  }).join("");
  document.getElementById(fieldId("method.name")).addEventListener("change", () => {
    values = collect();
    renderForm();
  });
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
      out.innerHTML = `started: ${runLink(result.run)} (${esc(result.job.state)})`;
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
    values = (await getJSON(`/api/form/values?kind=${kind}&name=${encodeURIComponent(name)}`)).values;
    renderForm();
    document.getElementById("result").textContent = "";
  } catch (error) {
    document.getElementById("result").textContent = error.message;
  }
}

async function init() {
  schema = await getJSON("/api/form");
  const preset = param("from");  // e.g. run:NAME or example:NAME
  document.getElementById("template").innerHTML = `<option value="">(empty form)</option>`
    + `<optgroup label="examples">` + schema.examples.map(e => `<option value="example:${esc(e)}">${esc(e)}</option>`).join("")
    + `</optgroup><optgroup label="earlier runs">` + schema.runs.map(r => `<option value="run:${esc(r)}">${esc(r)}</option>`).join("")
    + `</optgroup>`;
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
    document.getElementById("result").innerHTML = `stopped: ${runLink(startedRun)} (resume it from its page)`;
  } catch (error) {
    document.getElementById("result").textContent = error.message;
  }
});
init();
