// Playground: label a text with a classifier run, or stream a generative run's answer beside its base model's.
"use strict";
navigation("/playground");
let runs = [];

function current() { return runs.find(r => r.name === document.getElementById("run").value); }

function showPanel() {
  const run = current();
  document.getElementById("classify").hidden = !run || !run.labels;
  document.getElementById("chat").hidden = !run || !run.answers;
  document.getElementById("kind").textContent = run ? `${run.task} · ${run.model} · ${run.method}` : "no finished runs";
  document.getElementById("base-name").textContent = run ? `(${run.model})` : "";
}

async function predict() {
  document.getElementById("predict-error").textContent = "";
  try {
    const result = await postJSON("/api/predict", {run: current().name, text: document.getElementById("text").value});
    document.getElementById("labels").replaceChildren(
      el("tr", {}, el("th", {}, "label"), el("th", {}, "probability"), el("th")),
      ...result.labels.map(l => el("tr", {}, el("td", {}, l.label), el("td", {class: "num"}, l.probability.toFixed(4)),
        el("td", {}, el("span", {class: "bar", style: `width:${Math.round(l.probability * 200)}px`})))));
  } catch (error) {
    document.getElementById("predict-error").textContent = error.message;
  }
}

// POST /api/chat answers with server-sent events; fetch's stream reader shows each piece as it arrives.
async function stream(which) {
  const box = document.getElementById(`answer-${which}`);
  box.textContent = "";
  box.dataset.done = "";
  const response = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({run: current().name, model: which, text: document.getElementById("prompt").value,
                          max_new_tokens: Number(document.getElementById("tokens").value) || 64})});
  if (!response.ok) {
    box.textContent = (await response.json()).error || response.statusText;
    box.dataset.done = "error";
    return;
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = JSON.parse(event.split("\n").find(line => line.startsWith("data: ")).slice(6));
      if (event.startsWith("event: done")) box.dataset.done = "yes";
      else if (event.startsWith("event: error")) { box.textContent += `\n[error: ${data.error}]`; box.dataset.done = "error"; }
      else box.textContent += data.text;
    }
  }
}

async function init() {
  runs = (await getJSON("/api/runs")).runs.filter(r => r.status === "finished");
  const wanted = param("run");
  if (wanted && !runs.some(r => r.name === wanted)) {  // a run not in the runs list: a study's trial
    const run = await getJSON(`/api/run?name=${encodeURIComponent(wanted)}`).catch(() => null);
    if (run && run.status === "finished") runs.push(run);
  }
  document.getElementById("run").replaceChildren(...runs.map(r => el("option", {}, r.name)));
  if (wanted) document.getElementById("run").value = wanted;
  showPanel();
}

document.getElementById("run").addEventListener("change", showPanel);
document.getElementById("predict").addEventListener("click", predict);
document.getElementById("send").addEventListener("click", () => {
  document.getElementById("chat-error").textContent = "";
  Promise.all([stream("base"), stream("tuned")]).catch(error => {
    document.getElementById("chat-error").textContent = error.message;
  });
});
init();
