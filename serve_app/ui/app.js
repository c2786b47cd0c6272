// The slimray page: chat with the assistant (streamed replies), the served model versions, and the monitor.
// Plain DOM, no framework and no network beyond this server. Every text from the server or the user is put
// in the page as a text node (never parsed as HTML): customer messages and stored texts are untrusted.
"use strict";

const TOKEN_KEY = "slimray-api-token";  // kept in this tab only (sessionStorage)
const REFRESH_MS = 5000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function notice(text) {
  const p = document.getElementById("notice");
  p.textContent = text || "";
  p.hidden = !text;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    document.getElementById("auth").hidden = false;
    notice("This server needs an API token: enter it above.");
    throw new Unauthorized("401");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).error || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function percent(x) { return (100 * x).toFixed(1) + "%"; }

// ---------------------------------------------------------------------------------------------------------
// Chat

// The message with its entities marked. Offsets count Unicode code points (Python's str), not UTF-16 units.
function highlighted(message, entities) {
  const chars = Array.from(message);
  const out = [];
  let at = 0;
  for (const e of [...(entities || [])].sort((a, b) => a.start - b.start)) {
    if (e.start < at || e.end > chars.length) continue;
    out.push(chars.slice(at, e.start).join(""));
    out.push(el("mark", { class: "entity", title: `${e.type} (${percent(e.score)})`, "data-type": e.type },
                chars.slice(e.start, e.end).join(""), el("small", {}, e.type)));
    at = e.end;
  }
  out.push(chars.slice(at).join(""));
  return out;
}

function answerMeta(done) {
  const source = el("span", { class: "source " + done.source }, {
    playbook: "from the playbook", generated: "generated from the documents", handoff: "handed off to a human",
  }[done.source] || done.source);
  const meta = el("div", { class: "meta" },
    el("span", { class: "intent" }, "intent ", el("b", {}, done.intent), " ", percent(done.confidence)),
    " · ", source,
    done.model_version ? ` · model ${done.model_version}` : null);
  if (done.handoff && done.handoff_reason) meta.append(` (${done.handoff_reason.replace("_", " ")})`);
  if (done.finish_reason && done.finish_reason !== "stop") meta.append(` · stopped: ${done.finish_reason}`);
  const parts = [meta];
  if (done.citations && done.citations.length) {
    parts.push(el("ul", { class: "citations" }, done.citations.map(c =>
      el("li", { "data-id": c.id }, el("code", {}, c.id), " ", c.title, " ", el("small", {}, c.score.toFixed(2))))));
  }
  return parts;
}

async function ask(message) {
  const list = document.getElementById("messages");
  const said = el("li", { class: "user" }, el("p", { class: "text" }, message));
  const text = el("p", { class: "text streaming" });
  const reply = el("li", { class: "assistant" }, text);
  list.append(said, reply);
  reply.scrollIntoView({ block: "end" });
  try {
    const response = await api("/v1/assist?stream=true", { method: "POST", body: JSON.stringify({ message }) });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = null;
    for (;;) {
      const { value, done: ended } = await reader.read();
      if (value) buffer += decoder.decode(value, { stream: !ended });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const fields = {};
        for (const line of block.split("\n")) {
          const i = line.indexOf(": ");
          if (i > 0) fields[line.slice(0, i)] = line.slice(i + 2);
        }
        const data = JSON.parse(fields.data || "null");
        if (fields.event === "token") text.append(data.text);
        else if (fields.event === "done") done = data;
      }
      if (ended) break;
    }
    text.classList.remove("streaming");
    if (done === null) throw new Error("the stream ended without an answer");
    text.textContent = done.reply;  // the whole answer, citations taken out
    reply.classList.add(done.source);
    reply.append(...answerMeta(done));
    said.replaceChildren(el("p", { class: "text" }, highlighted(message, done.entities)));
  } catch (e) {
    text.classList.remove("streaming");
    reply.classList.add("error");
    text.textContent = e instanceof Unauthorized ? "Not sent: the server needs an API token." : `Error ${e.message}`;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Models

let described = null;

async function loadModels() {
  described = await (await api("/v1/models")).json();
  const rows = (described.versions || []).map(v => el("tr", {},
    el("td", {}, v.version), el("td", {}, v.role), el("td", {}, percent(v.traffic_fraction)),
    el("td", {}, typeof v.handoff_threshold === "number" ? v.handoff_threshold.toFixed(3) : ""),
    el("td", {}, v.backend || "")));
  document.querySelector("#versions tbody").replaceChildren(...rows);
  const served = [];
  const item = (name, value) => { if (value) served.push(el("dt", {}, name), el("dd", {}, value)); };
  if (described.entity_model) item("Entity model", `${described.entity_model.version} (${described.entity_model.backend || ""})`);
  if (described.sentiment_model) item("Sentiment model", described.sentiment_model.version);
  if (described.knowledge) item("Knowledge index", `${described.knowledge.passages} passages from ` +
                                `${described.knowledge.documents} documents`);
  if (described.generator) item("Generator", `${described.generator.generator} (${described.generator.backend}, ` +
                                `${described.generator.batching} batching)`);
  if (described.routing) item("Canary share", percent(described.routing.canary_fraction || 0));
  if (described.playbook) item("Playbook", described.playbook.source);
  document.getElementById("served").replaceChildren(...served);
  document.getElementById("models-json").textContent = JSON.stringify(described, null, 2);
  document.querySelector('nav [data-tab="monitor"]').hidden = !described.sentiment_model;
  return described;
}

// ---------------------------------------------------------------------------------------------------------
// Monitor

const LABELS = ["negative", "neutral", "positive"];
let topic = null;

function mixBar(point) {
  const bar = el("span", { class: "mix", title: LABELS.map(l => `${l} ${point[l]}`).join(", ") });
  for (const label of LABELS) {
    if (!point[label]) continue;
    const part = el("span", { class: label });
    part.style.flexGrow = point[label];  // CSSOM, which the page's Content-Security-Policy allows
    bar.append(part);
  }
  return bar;
}

function drawTrend(points, alerts) {
  const chart = document.getElementById("trend");
  chart.replaceChildren();
  if (!points.length) return;
  const W = 640, H = 240, pad = 28;
  const HOUR = 3600 * 1000;  // the trend's buckets (?bucket=1h): the last one ends an hour after its start
  const t0 = Date.parse(points[0].start);
  const t1 = Math.max(Date.parse(points[points.length - 1].start) + HOUR,
                      ...alerts.map(a => Date.parse(a.window_end)), t0 + 1);
  const x = t => pad + (W - 2 * pad) * (t - t0) / (t1 - t0);
  const y = share => H - pad - (H - 2 * pad) * share;
  for (const a of alerts) {  // alert windows behind the lines
    const left = x(Math.max(Date.parse(a.window_start), t0)), right = x(Math.min(Date.parse(a.window_end), t1));
    chart.append(svg("rect", { class: "alert", x: left, y: pad, width: Math.max(right - left, 3), height: H - 2 * pad }));
  }
  chart.append(svg("line", { class: "axis", x1: pad, y1: y(0), x2: W - pad, y2: y(0) }),
               svg("line", { class: "axis", x1: pad, y1: y(1), x2: W - pad, y2: y(1) }));
  for (const label of LABELS) {
    const coords = points.map(p => `${x(Date.parse(p.start) + HOUR / 2).toFixed(1)},` +  // at the bucket's middle
                                   `${y(p.n ? p[label] / p.n : 0).toFixed(1)}`);
    chart.append(svg("polyline", { class: "line " + label, points: coords.join(" ") }));
  }
  const label = (text, attrs) => { const t = svg("text", attrs); t.textContent = text; chart.append(t); };
  label("100%", { x: 2, y: y(1) + 4 });
  label("0%", { x: 2, y: y(0) + 4 });
  label(new Date(t0).toISOString().slice(0, 16).replace("T", " "), { x: pad, y: H - 6 });
  label(new Date(t1).toISOString().slice(0, 16).replace("T", " "), { x: W - pad, y: H - 6, "text-anchor": "end" });
}

async function loadMonitor() {
  const { topics } = await (await api("/v1/topics?bucket=1h")).json();
  if (topic === null && topics.length) topic = topics[0].topic;
  document.querySelector("#topics tbody").replaceChildren(...topics.map(t => {
    const row = el("tr", { class: t.topic === topic ? "selected" : "" },
                   el("td", {}, el("button", { type: "button", class: "link" }, t.topic)), el("td", {}, mixBar(t)),
                   el("td", {}, t.n));
    row.querySelector("button").addEventListener("click", () => { topic = t.topic; loadMonitor().catch(failed); });
    return row;
  }));
  const { alerts } = await (await api("/v1/alerts")).json();
  document.getElementById("alerts").replaceChildren(...alerts.slice().reverse().map(a => el("li", {},
    el("b", {}, a.topic), ` ${a.window_start.slice(0, 16).replace("T", " ")} – ${a.window_end.slice(11, 16)}: `,
    `${a.negative} of ${a.n} negative (baseline ${percent(a.baseline)}, score ${a.score.toFixed(1)})`,
    el("ul", { class: "examples" }, (a.examples || []).map(x => el("li", {}, el("q", {}, x.text)))))));
  if (topic !== null) {
    document.getElementById("trend-title").textContent = `Trend: ${topic}`;
    const { points } = await (await api(`/v1/topics/${encodeURIComponent(topic)}/trend?bucket=1h`)).json();
    drawTrend(points, alerts.filter(a => a.topic === topic));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Wiring

function failed(e) { if (!(e instanceof Unauthorized)) notice(`Could not load: ${e.message}`); }

let timer = null;

function show(tab) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const s of document.querySelectorAll("main .tab")) s.hidden = s.id !== tab;
  clearInterval(timer);
  if (tab === "models") loadModels().catch(failed);
  if (tab === "monitor") {
    loadMonitor().catch(failed);
    timer = setInterval(() => loadMonitor().catch(failed), REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.tab));
  document.getElementById("ask").addEventListener("submit", event => {
    event.preventDefault();
    const input = document.getElementById("message");
    const message = input.value.trim();
    input.value = "";
    if (message) ask(message);
  });
  document.getElementById("auth").addEventListener("submit", event => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
    document.getElementById("auth").hidden = true;
    notice("");
    loadModels().catch(failed);
  });
  if (location.hash === "#monitor" || location.hash === "#models") {
    loadModels().then(() => show(location.hash.slice(1))).catch(failed);
  } else {
    loadModels().catch(failed);  // shows the Monitor tab when a sentiment model is served
  }
});
