// steerserve playground: every piece of data comes from the authenticated API, called with the
// key the user types (sent as a Bearer header, kept in this tab's sessionStorage only).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("steerserve-key") || "", model: null, layers: [], steering: [], traces: {} };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

const fmt = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(2));
const sig = (x) => String(Number(x.toPrecision(2)));  // histogram edges span 1e-3 to 1e4
const featureName = (f) => `L${f.layer} #${f.index}`;
// Tokens as text a reader can see: spaces and newlines made visible.
const showToken = (t) => t.replace(/\n/g, "↵").replace(/ /g, "·") || "∅";

function headers(json) {
  const h = json ? { "content-type": "application/json" } : {};
  if (state.key) h.authorization = `Bearer ${state.key}`;
  return h;
}

// The API's error shape, {"error": {"message", ...}}, as one line of text.
async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

// ---- connection ---------------------------------------------------------------------------

async function connect() {
  const status = $("status");
  status.textContent = "connecting…";
  try {
    const [models, saes] = await Promise.all([api("/v1/models"), api("/v1/saes")]);
    state.model = models.data[0].id;
    state.layers = saes.data.map((s) => s.layer);
    status.textContent = `${state.model}; SAE layers ${state.layers.join(", ")}`;
    status.className = "ok";
    fillLayerSelect($("search-layer"), true);
  } catch (e) {
    status.textContent = `not connected: ${e.message}`;
    status.className = "error";
  }
}

function fillLayerSelect(select, withAll) {
  select.replaceChildren(...(withAll ? [el("option", { value: "", text: "all" })] : []),
    ...state.layers.map((l) => el("option", { value: String(l), text: String(l) })));
}

// ---- search ---------------------------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  const params = new URLSearchParams({ [$("search-by").value]: $("search-q").value, limit: "20" });
  if ($("search-layer").value) params.set("layer", $("search-layer").value);
  const message = $("search-message");
  const list = $("search-results");
  message.textContent = "searching…";
  list.replaceChildren();
  try {
    const result = await api(`/v1/features/search?${params}`);
    message.textContent = `${result.total} feature${result.total === 1 ? "" : "s"} found`;
    list.append(...result.data.map((hit) => el("li", {},
      el("button", { type: "button", class: "link", onclick: () => openFeature(hit.layer, hit.index) },
        `${featureName(hit)}: ${hit.label ?? "(no label)"}`),
      hit.logit !== undefined ? el("span", { class: "numbers", text: ` logit ${fmt(hit.logit)}` }) : "",
      hit.description ? el("p", { class: "description" }, ...marked(hit.description)) : "")));
  } catch (e) {
    message.textContent = e.message;
  }
}

// ---- feature page ---------------------------------------------------------------------------

async function openFeature(layer, index) {
  const panel = $("feature-panel");
  try {
    const f = await api(`/v1/features/${layer}/${index}`);
    panel.hidden = false;
    $("feature-title").textContent = `${featureName(f)}: ${f.label ?? "(no label)"}`;
    $("feature-description").replaceChildren(...marked(f.description ?? ""));
    const mean = meanActivation(f);
    $("feature-numbers").textContent = (mean ? `mean activation when it fires ${fmt(mean.value)} (from ${mean.source}); ` : "") +
      `decoder norm ${fmt(f.decoder_norm)}, encoder norm ${fmt(f.encoder_norm)}, encoder/decoder cosine ${fmt(f.encoder_decoder_cosine)}`;
    for (const side of ["promoted", "suppressed"]) {
      $(`lens-${side}`).tBodies[0].replaceChildren(...f.logit_lens[side].map((t) =>
        el("tr", {}, el("td", {}, el("code", { text: showToken(t.token) })), el("td", { text: fmt(t.logit) }))));
    }
    renderExplanation(f.explanation);
    renderHistogram(f.histogram);
    renderExamples(f.top_examples);
    $("feature-steer").onclick = () => addSteering(f);
    panel.scrollIntoView({ block: "nearest" });
  } catch (e) {
    $("search-message").textContent = e.message;
  }
}

// The default model's labels mark a context's firing token as [[token]] (models/recipe/feature_labeling.py).
function marked(text) {
  return text.split(/\[\[(.*?)\]\]/s).map((part, i) => (i % 2 ? el("mark", { text: part }) : part));
}

// Dashboards with explanations (steerserve dashboards --explain): {"text", "model", "detection_score", ...}.
function renderExplanation(explanation) {
  const box = $("feature-explanation");
  box.hidden = !explanation;
  if (!explanation) return;
  const score = explanation.detection_score === null ? "no detection score"
    : `detection score ${fmt(explanation.detection_score)} (0.5 = chance; ${explanation.held_out} held-out vs ${explanation.random} random contexts)`;
  box.textContent = `Explanation by ${explanation.model}: ${explanation.text} (${score})`;
}

// Dashboards (when the server has them): {"histogram": {"edges": [n+1], "counts": [n]}}.
function renderHistogram(histogram) {
  const box = $("feature-histogram");
  box.replaceChildren();
  if (!histogram || !histogram.counts || !histogram.counts.length) return;
  const max = Math.max(...histogram.counts, 1);
  const edges = histogram.edges || [];
  const width = 12, height = 80;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${histogram.counts.length * width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "activation histogram");
  histogram.counts.forEach((count, i) => {
    const h = (count / max) * height;
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    Object.entries({ x: i * width + 1, y: height - h, width: width - 2, height: h }).forEach(([k, v]) => bar.setAttribute(k, v));
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = edges.length > i + 1 ? `${sig(edges[i])}–${sig(edges[i + 1])}: ${count}` : String(count);
    bar.append(title);
    svg.append(bar);
  });
  const total = histogram.counts.reduce((a, b) => a + b, 0);
  const caption = edges.length ? `activation ${sig(edges[0])} to ${sig(edges[edges.length - 1])}, log-spaced bins; ` : "";
  box.append(el("h3", { text: "Activation histogram" }), svg,
    el("p", { class: "caption", text: `${caption}${total} firing tokens` }));
}

// Dashboards (when the server has them): {"top_examples": [{"tokens": [...], "activations": [...]}]}.
function renderExamples(examples) {
  const box = $("feature-examples");
  box.replaceChildren();
  if (!examples || !examples.length) return;
  const max = Math.max(...examples.flatMap((e) => e.activations), 1e-9);
  box.append(el("h3", { text: "Top activating examples" }), el("ol", { class: "examples" },
    ...examples.map((e) => el("li", {}, ...e.tokens.map((t, i) =>
      heatSpan(t, e.activations[i] / max, `${fmt(e.activations[i])}`))))));
}

function heatSpan(text, strength, title) {
  const span = el("span", { class: "tok", title, text });
  span.style.backgroundColor = `rgba(255, 120, 0, ${Math.max(0, Math.min(1, strength)) * 0.85})`;
  return span;
}

// ---- steering controls ----------------------------------------------------------------------

// A clamp of about five times a feature's mean activation when it fires steers the default
// model's language features (README, first look: German 3:424, mean 15.63, clamp 78.2). The mean
// comes from the feature's dashboard (steerserve dashboards), else from its label's description
// ("mean activation 15.63", models/recipe/feature_labeling.py), as bench-steering reads it.
const CLAMP_TIMES_MEAN = 5;
const FALLBACK_CLAMP = 50;  // a feature with neither
const MEAN_IN_DESCRIPTION = /mean activation (\d+(?:\.\d+)?)/;

function meanActivation(f) {
  if (f.mean_activation > 0) return { value: f.mean_activation, source: "its dashboard" };
  const found = MEAN_IN_DESCRIPTION.exec(f.description || "");
  return found && Number(found[1]) > 0 ? { value: Number(found[1]), source: "its label" } : null;
}

function defaultClamp(f) {
  const mean = meanActivation(f);
  if (!mean) return { value: FALLBACK_CLAMP, why: `no mean activation known (no dashboard, none in its label): ${FALLBACK_CLAMP}` };
  const value = Math.round(CLAMP_TIMES_MEAN * mean.value * 10) / 10;
  return { value, why: `${value} = ${CLAMP_TIMES_MEAN} × mean activation when it fires ${fmt(mean.value)} (from ${mean.source})` };
}

function addSteering(f) {
  if (state.steering.some((s) => s.layer === f.layer && s.index === f.index)) return;
  const clamp = defaultClamp(f);
  state.steering.push({ layer: f.layer, index: f.index, label: f.label, mode: "clamp", value: clamp.value, why: clamp.why });
  renderSteering();
  $("chat-panel").scrollIntoView({ block: "nearest" });
}

function renderSteering() {
  const list = $("steering-list");
  list.querySelectorAll(".steer").forEach((n) => n.remove());
  $("steering-empty").hidden = state.steering.length > 0;
  state.steering.forEach((s, i) => {
    const id = `steer-${s.layer}-${s.index}`;
    const range = Math.max(200, Math.ceil(Math.abs(s.value) * 2));
    const slider = el("input", { type: "range", id: `${id}-slider`, min: String(-range), max: String(range), step: "0.1", value: String(s.value),
      "aria-label": `value of ${featureName(s)}` });
    const number = el("input", { type: "number", id: `${id}-value`, step: "0.1", value: String(s.value),
      "aria-label": `value of ${featureName(s)} (exact)` });
    const mode = el("select", { id: `${id}-mode`, "aria-label": `mode of ${featureName(s)}` },
      ...["clamp", "add", "scale", "ablate"].map((m) => el("option", { value: m, text: m })));
    mode.value = s.mode;
    // Each control updates the other, never itself (that would fight the user's typing).
    slider.addEventListener("input", () => { s.value = Number(slider.value); number.value = slider.value; });
    number.addEventListener("input", () => {
      if (number.value === "" || !Number.isFinite(Number(number.value))) return;
      s.value = Number(number.value);
      slider.value = number.value;
    });
    const disable = () => { slider.disabled = number.disabled = s.mode === "ablate"; };
    mode.addEventListener("change", () => { s.mode = mode.value; disable(); });
    disable();
    list.append(el("div", { class: "steer" },
      el("span", { class: "name", text: `${featureName(s)}: ${s.label ?? ""}` }), mode, slider, number,
      el("button", { type: "button", "aria-label": `remove ${featureName(s)}`, text: "✕",
        onclick: () => { state.steering.splice(i, 1); renderSteering(); } }),
      el("p", { class: "caption", id: `${id}-default`, text: `default clamp ${s.why}` })));
  });
}

function steeringSpec() {
  return { features: state.steering.map((s) => s.mode === "ablate"
    ? { layer: s.layer, index: s.index, mode: s.mode }
    : { layer: s.layer, index: s.index, mode: s.mode, value: s.value }) };
}

// ---- chat: two streams, default and steered, at once -----------------------------------------

function chatBody(steered) {
  const body = {
    model: state.model,
    messages: [{ role: "user", content: $("chat-message").value }],
    max_tokens: Number($("chat-max-tokens").value),
    temperature: Number($("chat-temperature").value),
    seed: 0,
    stream: true,
    logprobs: true,  // the generated tokens one by one, for the trace's heatmap
  };
  if (state.layers.length) body.trace = { layers: state.layers, top_k: Number($("chat-top-k").value) };  // none without --sae
  if (steered) body.steering = steeringSpec();
  return body;
}

// One streamed chat completion: text goes to `out` as it arrives; returns the tokens and trace.
async function stream(body, out) {
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const result = { tokens: [], trace: [] };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "").trim();
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) out.textContent += choice.delta.content;
        if (choice.logprobs && choice.logprobs.content) result.tokens.push(...choice.logprobs.content.map((t) => t.token));
        if (choice.trace) result.trace.push(...choice.trace);
      }
    }
  }
  return result;
}

async function runChat(event) {
  event.preventDefault();
  if (!state.model) await connect();
  const line = $("chat-message-line");
  const run = $("chat-run");
  const outs = { default: $("answer-default"), steered: $("answer-steered") };
  Object.values(outs).forEach((o) => o.replaceChildren());
  const steered = chatBody(true);
  showRequest(steered);
  line.textContent = state.steering.length ? "generating…" : "generating (no steering chosen: both answers are the default)…";
  run.disabled = true;
  try {
    const [plain, edited] = await Promise.all([stream(chatBody(false), outs.default), stream(steered, outs.steered)]);
    state.traces = { default: plain, steered: edited };
    line.textContent = outs.default.textContent === outs.steered.textContent ? "done: the answers are the same" : "done: the answers differ";
    if (edited.trace.length) showTrace();
  } catch (e) {
    line.textContent = e.message;
  } finally {
    run.disabled = false;
  }
}

// ---- "copy as curl / Python" --------------------------------------------------------------------

// One top-level key per line, values compact: short enough to read, valid JSON to paste.
const jsonLines = (body) => `{\n${Object.entries(body).map(([k, v]) => `  ${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(",\n")}\n}`;

function curlOf(body) {
  const json = jsonLines(body).replace(/'/g, "'\\''");
  return `curl -N ${location.origin}/v1/chat/completions \\\n  -H "Authorization: Bearer $STEERSERVE_API_KEY" \\\n` +
    `  -H 'content-type: application/json' -d '${json}'`;
}

function pythonOf(body) {
  const { model, messages, stream: _, steering, trace, ...rest } = body;
  const py = (x) => JSON.stringify(x).replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False").replace(/\bnull\b/g, "None");
  const args = Object.entries(rest).map(([k, v]) => `    ${k}=${py(v)},`).join("\n");
  return `import os\nfrom openai import OpenAI\n\n` +
    `client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("STEERSERVE_API_KEY", "none"))\n` +
    `stream = client.chat.completions.create(\n    model=${py(model)},\n    messages=${py(messages)},\n${args}\n` +
    `    stream=True,\n    extra_body={"steering": ${py(steering)}, "trace": ${py(trace)}},\n)\n` +
    `for chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n` +
    `        print(chunk.choices[0].delta.content, end="", flush=True)\nprint()\n`;
}

function showRequest(body) {
  const show = (kind) => {
    $("tab-curl").setAttribute("aria-selected", String(kind === "curl"));
    $("tab-python").setAttribute("aria-selected", String(kind === "python"));
    $("request-code").textContent = kind === "curl" ? curlOf(body) : pythonOf(body);
  };
  $("tab-curl").onclick = () => show("curl");
  $("tab-python").onclick = () => show("python");
  show($("tab-python").getAttribute("aria-selected") === "true" ? "python" : "curl");
}

async function copyRequest() {
  const text = $("request-code").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-request").textContent = "Copied";
  } catch (_) {  // no clipboard (plain http on another host): select the text for Ctrl+C
    getSelection().selectAllChildren($("request-code"));
    $("copy-request").textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => { $("copy-request").textContent = "Copy"; }, 2000);
}

// ---- trace heatmap ----------------------------------------------------------------------------

function showTrace() {
  $("trace-panel").hidden = false;
  const layerSelect = $("trace-layer");
  const keep = layerSelect.value;
  fillLayerSelect(layerSelect, false);
  layerSelect.value = keep && state.layers.includes(Number(keep)) ? keep : String(state.layers[state.layers.length - 1]);
  const colour = $("trace-color");
  const keepColour = colour.value;
  colour.replaceChildren(el("option", { value: "top", text: "strongest feature" }),
    ...state.steering.map((s) => el("option", { value: `${s.layer}:${s.index}`, text: `${featureName(s)} ${s.label ?? ""}` })));
  if ([...colour.options].some((o) => o.value === keepColour)) colour.value = keepColour;
  drawHeatmaps();
}

// Entry i of a "generation" trace is the position that predicted token i: the prompt's last
// position for i = 0, else the position reading token i - 1. So token j's own features are entry
// j + 1, entry 0 belongs to the end of the prompt, and the last token has none.
function cells(run) {
  const all = [{ text: "⟨prompt end⟩", entry: run.trace[0], prompt: true }];
  run.tokens.forEach((t, j) => all.push({ text: t, entry: run.trace[j + 1] }));
  return all;
}

function drawHeatmaps() {
  const layer = $("trace-layer").value;
  const colour = $("trace-color").value;
  const strength = (entry) => {
    const feats = entry && entry.features[layer];
    if (!feats || !feats.length) return 0;
    if (colour === "top") return feats[0].activation;
    const [l, i] = colour.split(":").map(Number);
    if (String(l) !== layer) return 0;
    const hit = feats.find((f) => f.index === i);
    return hit ? hit.activation : 0;
  };
  const runs = ["default", "steered"].map((name) => [name, cells(state.traces[name])]);
  const max = Math.max(1e-9, ...runs.flatMap(([, cs]) => cs.map((c) => strength(c.entry))));
  $("trace-scale").textContent = `Colour: activation at layer ${layer} of ${colour === "top" ? "each position's strongest feature" :
    `feature ${colour} (0 where it is not in the top-k)`}, on one scale for both answers (full colour = ${fmt(max)}).`;
  for (const [name, cs] of runs) {
    $(`heatmap-${name}`).replaceChildren(...cs.map((c) => {
      const span = heatSpan(showToken(c.text), strength(c.entry) / max, "");
      span.removeAttribute("title");
      span.tabIndex = 0;
      if (c.prompt) span.classList.add("prompt-end");
      const show = () => showDetails(c, name, layer);
      span.addEventListener("mouseenter", show);
      span.addEventListener("focus", show);
      return span;
    }));
  }
}

function showDetails(cell, run, layer) {
  const box = $("token-details");
  const feats = cell.entry ? cell.entry.features[layer] || [] : [];
  box.replaceChildren(el("h3", { text: `${run}: ${cell.prompt ? "end of prompt" : `token “${showToken(cell.text)}”`}` +
    (cell.entry ? ` (position ${cell.entry.position}), layer ${layer}` : "") }));
  if (!cell.entry) {
    box.append(el("p", { class: "message", text: "the last token is never read by the model, so it has no features" }));
    return;
  }
  box.append(el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "feature" }), el("th", { text: "activation" }), el("th", { text: "label" }))),
    el("tbody", {}, ...feats.map((f) => el("tr", {},
      el("td", {}, el("button", { type: "button", class: "link", onclick: () => openFeature(Number(layer), f.index) }, `#${f.index}`)),
      el("td", { text: fmt(f.activation) }), el("td", { text: f.label ?? "" }))))));
}

// ---- wiring -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("steerserve-key", state.key);
    connect();
  });
  $("search-form").addEventListener("submit", search);
  $("chat-form").addEventListener("submit", runChat);
  $("copy-request").addEventListener("click", copyRequest);
  $("trace-layer").addEventListener("change", drawHeatmaps);
  $("trace-color").addEventListener("change", drawHeatmaps);
  connect();
});
