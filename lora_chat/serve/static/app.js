// The side-by-side chat page. It talks only to this server's OpenAI-compatible endpoints (/v1/models,
// /v1/chat/completions), the same ones any client uses, so what a person sees here is what an API user gets.
// When the server records (serve --record), it also offers feedback through /v1/feedback: per reply up, down
// and an edit; with several panes on the same prompt, which reply is better.
// No build step and no third-party code: the page works offline.
"use strict";

const MAX_PANES = 4;
const KEY_STORE = "lorachat-api-key"; // sessionStorage: this tab only, gone when it closes
const ROUTE_HEADER = "x-lorachat-route";

const $ = (selector) => document.querySelector(selector);
const state = { models: [], panes: [], busy: 0, recording: false };
const LETTERS = "ABCD";

// ------------------------------------------------------------------ the API, with the key asked for once

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function askForKey() {
  const dialog = $("#key-dialog");
  return new Promise((resolve) => {
    $("#api-key").value = "";
    dialog.addEventListener("close", () => {
      sessionStorage.setItem(KEY_STORE, $("#api-key").value);
      resolve();
    }, { once: true });
    dialog.showModal();
  });
}

// fetch, asking for the key again whenever the server says it is missing or wrong.
async function api(path, init = {}) {
  for (;;) {
    const response = await fetch(path, { ...init, headers: headers() });
    if (response.status !== 401) return response;
    await askForKey();
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// ------------------------------------------------------------------ models

function facts(model) {
  if (model.id === "auto") return "the router picks an adapter per message";
  if (!model.parent) return "base model";
  const parts = [];
  if (model.domain) parts.push(model.domain);
  if (model.language) parts.push(model.language);
  if (model.rank) parts.push(`r=${model.rank}`);
  const loss = model.eval?.loss;
  if (typeof loss === "number") parts.push(`eval loss ${loss.toFixed(2)}`);
  const wins = Object.entries(model.eval || {}).find(([key]) => key.startsWith("wins_vs_base"));
  if (wins && typeof model.eval.samples === "number") parts.push(`won ${wins[1]}/${model.eval.samples} vs base`);
  return parts.join(" · ") || "adapter";
}

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) throw new Error(await errorText(response));
  const body = await response.json();
  state.models = body.data;
  if (state.models.some((m) => m.parent)) state.models.push({ id: "auto", object: "model" });
  renderModelList();
}

function renderModelList() {
  const list = $("#models");
  list.replaceChildren();
  for (const model of state.models) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.model = model.id;
    button.setAttribute("aria-pressed", String(state.panes.some((p) => p.model === model.id)));
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = model.id;
    const info = document.createElement("span");
    info.className = "facts";
    info.textContent = facts(model);
    button.append(name, info);
    button.addEventListener("click", () => togglePane(model.id));
    item.append(button);
    list.append(item);
  }
}

// ------------------------------------------------------------------ panes

function togglePane(id) {
  const open = state.panes.find((p) => p.model === id);
  if (open) closePane(open);
  else openPane(id);
}

function openPane(id) {
  if (state.panes.length >= MAX_PANES) {
    notice(`at most ${MAX_PANES} panes side by side: close one first`);
    return;
  }
  const model = state.models.find((m) => m.id === id);
  const el = $("#pane-template").content.firstElementChild.cloneNode(true);
  el.dataset.model = id;
  el.querySelector(".pane-title").textContent = id;
  el.querySelector(".pane-meta").textContent = facts(model);
  const pane = { model: id, messages: [], el, list: el.querySelector(".messages") };
  el.querySelector(".close").addEventListener("click", () => closePane(pane));
  el.querySelector(".copy").addEventListener("click", () => copyConversation(pane));
  state.panes.push(pane);
  $("#panes").append(el);
  relabel();
  syncAddress();
  renderModelList();
}

// Panes are A, B, C, D in their order on screen: the letters the comparison buttons name.
function relabel() {
  state.panes.forEach((p, i) => { p.el.querySelector(".pane-letter").textContent = LETTERS[i]; });
  hideCompare();
}

function closePane(pane) {
  pane.controller?.abort();
  pane.el.remove();
  state.panes = state.panes.filter((p) => p !== pane);
  relabel();
  syncAddress();
  renderModelList();
}

function syncAddress() {
  const url = new URL(location.href);
  if (state.panes.length) url.searchParams.set("models", state.panes.map((p) => p.model).join(","));
  else url.searchParams.delete("models");
  history.replaceState(null, "", url);
}

function notice(text) {
  const line = document.createElement("p");
  line.textContent = text;
  $("#notices").append(line);
}

function addMessage(pane, role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  pane.list.append(item);
  scrollToEnd(pane, true);
  return item;
}

// Follow the reply only while the reader is at the bottom, so scrolling up in a long reply stays put.
function scrollToEnd(pane, force = false) {
  const list = pane.list;
  const near = list.scrollHeight - list.scrollTop - list.clientHeight < 48;
  if (force || near) list.scrollTop = list.scrollHeight;
}

function conversation(pane) {
  const system = $("#system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...pane.messages];
}

// The messages format a recipe reads (`format: messages`), so a good exchange can become training data.
function conversationJSON(pane) {
  return JSON.stringify({ messages: conversation(pane) });
}

async function copyConversation(pane) {
  const text = conversationJSON(pane);
  try {
    await navigator.clipboard.writeText(text);
    setStatus(`copied ${pane.model}'s conversation as JSON`);
  } catch {
    window.prompt("Copy this conversation:", text); // no clipboard access (e.g. a plain-http LAN address)
  }
}

function setStatus(text) {
  $("#status").textContent = text;
}

// ------------------------------------------------------------------ sending and streaming

async function send(text) {
  if (!state.panes.length) {
    notice("open a model first: pick one (or several) in the list");
    return;
  }
  for (const pane of state.panes) pane.messages.push({ role: "user", content: text });
  state.busy = state.panes.length;
  $("#send").disabled = true;
  hideCompare();
  const answers = await Promise.all(state.panes.map((pane) => {
    addMessage(pane, "user", text);
    return streamReply(pane);
  }));
  state.busy = 0;
  $("#send").disabled = false;
  offerComparison(answers.filter(Boolean));
}

async function streamReply(pane) {
  const bubble = addMessage(pane, "assistant", "");
  bubble.classList.add("streaming");
  const sent = conversation(pane);
  let responseId = null;
  const body = {
    model: pane.model, messages: sent, stream: true,
    temperature: Number($("#temperature").value), max_tokens: Number($("#max-tokens").value),
  };
  pane.controller = new AbortController();
  let reply = "";
  let pending = "";
  let frame = 0;
  // Deltas are appended once per animation frame: a long, fast reply never blocks the page.
  const flush = () => {
    frame = 0;
    bubble.textContent += pending;
    pending = "";
    scrollToEnd(pane);
  };
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(body), signal: pane.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    showRoute(pane, response.headers.get(ROUTE_HEADER));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        responseId = chunk.id || responseId; // the completion id: what feedback refers to
        if (pane.model === "auto" && chunk.model) showAnswerer(pane, chunk.model);
        const delta = chunk.choices?.[0]?.delta?.content || "";
        if (delta) {
          reply += delta;
          pending += delta;
          if (!frame) frame = requestAnimationFrame(flush);
        }
      }
    }
    if (buffer.trim() && !buffer.includes("[DONE]")) throw new Error("the stream ended in the middle of a message");
  } catch (err) {
    if (err.name === "AbortError") return null;
    const lost = err instanceof TypeError; // fetch's network failure: the server went away
    addMessage(pane, "error", lost ? "connection lost: the server stopped mid-reply (what arrived is kept)" : err.message);
  } finally {
    if (frame) cancelAnimationFrame(frame);
    flush();
    bubble.classList.remove("streaming");
    if (reply) pane.messages.push({ role: "assistant", content: reply });
    else if (!bubble.textContent) bubble.remove();
    pane.controller = null;
  }
  if (!reply || !responseId || !state.recording) return null;
  addFeedback(pane, responseId, reply);
  return { pane, id: responseId, prompt: JSON.stringify(sent) };
}

// ------------------------------------------------------------------ feedback (only when the server records)

async function postFeedback(body) {
  const response = await api("/v1/feedback", { method: "POST", body: JSON.stringify(body) });
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

function feedbackButton(label, text, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  button.setAttribute("aria-label", label);
  button.title = label;
  button.addEventListener("click", onClick);
  return button;
}

// Up / down (pressing the pressed one takes the rating back) and an edit, under each finished reply.
function addFeedback(pane, id, reply) {
  const item = document.createElement("li");
  item.className = "feedback";
  item.dataset.response = id;
  const bar = document.createElement("div");
  bar.setAttribute("role", "group");
  bar.setAttribute("aria-label", `Feedback on ${pane.model}'s reply`);
  const up = feedbackButton("Good reply", "▲ Good", () => rate("up"));
  const down = feedbackButton("Bad reply", "▼ Bad", () => rate("down"));
  up.className = "vote-up";
  down.className = "vote-down";
  for (const b of [up, down]) b.setAttribute("aria-pressed", "false");
  const edit = feedbackButton("Edit: write what the reply should have said", "✎ Edit", () => openEditor());
  edit.className = "edit";
  bar.append(up, down, edit);
  item.append(bar);
  pane.list.append(item);
  scrollToEnd(pane);

  async function rate(vote) {
    const pressed = (vote === "up" ? up : down).getAttribute("aria-pressed") === "true";
    const rating = pressed ? "none" : vote;
    try {
      await postFeedback({ response_id: id, model: pane.model === "auto" ? undefined : pane.model, rating });
    } catch (err) {
      notice(`feedback not recorded: ${err.message}`);
      return;
    }
    up.setAttribute("aria-pressed", String(rating === "up"));
    down.setAttribute("aria-pressed", String(rating === "down"));
    setStatus(rating === "none" ? "rating taken back" : `recorded: ${rating === "up" ? "good" : "bad"} reply`);
  }

  function openEditor() {
    if (item.querySelector("form")) return;
    const form = document.createElement("form");
    form.className = "editor";
    const label = document.createElement("label");
    label.textContent = "What it should have said";
    const box = document.createElement("textarea");
    box.rows = 3;
    box.value = reply;
    label.append(box);
    const save = document.createElement("button");
    save.type = "submit";
    save.textContent = "Save edit";
    const cancel = feedbackButton("Cancel the edit", "Cancel", () => { form.remove(); edit.focus(); });
    form.append(label, save, cancel);
    form.addEventListener("keydown", (event) => { if (event.key === "Escape") cancel.click(); });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = box.value.trim();
      if (!text) return;
      try {
        await postFeedback({ response_id: id, model: pane.model === "auto" ? undefined : pane.model, edit: text });
      } catch (err) {
        notice(`edit not recorded: ${err.message}`);
        return;
      }
      form.remove();
      edit.textContent = "✎ Edited";
      edit.focus();
      setStatus("recorded: the edit");
    });
    item.append(form);
    box.focus();
  }
}

function hideCompare() {
  const bar = $("#compare");
  bar.hidden = true;
  bar.querySelector(".compare-choices").replaceChildren();
}

// Two or more panes answered the same messages: which reply is better (with more panes, which is best: it is
// recorded as beating each other one), or a tie.
function offerComparison(answers) {
  if (answers.length < 2 || answers.length !== state.panes.length) return;
  if (answers.some((a) => a.prompt !== answers[0].prompt)) return; // their histories differ: not one prompt
  const bar = $("#compare");
  const choices = bar.querySelector(".compare-choices");
  const word = answers.length === 2 ? "better" : "best";
  const buttons = [];
  const choose = async (winner, button) => {
    const pairs = winner === null ? answers.flatMap((a, i) => answers.slice(i + 1).map((b) => [a, b]))
      : answers.filter((a) => a !== winner).map((b) => [winner, b]);
    try {
      for (const [a, b] of pairs) {
        await postFeedback({ response_id: a.id, other_response_id: b.id, winner: winner === null ? "tie" : "a" });
      }
    } catch (err) {
      notice(`vote not recorded: ${err.message}`);
      return;
    }
    for (const b of buttons) b.setAttribute("aria-pressed", String(b === button));
    setStatus(`recorded: ${button.textContent}`);
  };
  answers.forEach((answer) => {
    const letter = LETTERS[state.panes.indexOf(answer.pane)];
    const button = feedbackButton(`${letter} (${answer.pane.model}) is ${word}`, `${letter} is ${word}`,
      () => choose(answer, button));
    buttons.push(button);
  });
  const tie = feedbackButton("Tie: neither is better", "Tie", () => choose(null, tie));
  buttons.push(tie);
  for (const b of buttons) b.setAttribute("aria-pressed", "false");
  choices.replaceChildren(...buttons);
  bar.hidden = false;
}

async function loadRecording() {
  const response = await api("/v1/feedback");
  if (!response.ok) return; // an older server without the route: no feedback controls
  const body = await response.json();
  state.recording = Boolean(body.recording);
  $("#recording").hidden = !state.recording;
}

// The router's decision arrives as `adapter=NAME; language=sv; language_score=0.970; domain_score=-; reason=...`.
function showRoute(pane, header) {
  if (pane.model !== "auto" || !header) return;
  const route = Object.fromEntries(header.split("; ").map((part) => {
    const at = part.indexOf("=");
    return [part.slice(0, at), part.slice(at + 1)];
  }));
  const scores = [route.language && route.language !== "-" && `language ${route.language} (${route.language_score})`,
    route.domain_score && route.domain_score !== "-" && `domain score ${route.domain_score}`].filter(Boolean).join(", ");
  const box = pane.el.querySelector(".route");
  box.textContent = route.adapter ? `routed to ${route.adapter}: ${route.reason}${scores ? ` — ${scores}` : ""}` : header;
  box.hidden = false;
}

function showAnswerer(pane, model) {
  const box = pane.el.querySelector(".route");
  if (box.hidden) {
    box.textContent = `answered by ${model}`;
    box.hidden = false;
  }
}

// ------------------------------------------------------------------ wiring

function wire() {
  const prompt = $("#prompt");
  $("#composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || state.busy) return;
    prompt.value = "";
    send(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("#composer").requestSubmit();
    }
  });
  $("#temperature").addEventListener("input", (e) => { $("#temperature-value").textContent = e.target.value; });
  $("#reset").addEventListener("click", () => {
    for (const pane of state.panes) {
      pane.controller?.abort();
      pane.messages = [];
      pane.list.replaceChildren();
      pane.el.querySelector(".route").hidden = true;
    }
    $("#notices").replaceChildren();
    hideCompare();
    setStatus("conversations cleared");
  });
}

async function start() {
  wire();
  try {
    await loadModels();
  } catch (err) {
    notice(`cannot list the models: ${err.message}`);
    return;
  }
  await loadRecording().catch((err) => notice(`cannot tell whether this server records: ${err.message}`));
  const wanted = new URL(location.href).searchParams.get("models");
  for (const id of (wanted ? wanted.split(",") : []).filter(Boolean)) {
    if (state.models.some((m) => m.id === id)) openPane(id);
    else notice(`unknown model '${id}' in the address: pick one from the list`);
  }
  if (!state.panes.length && !wanted && state.models.length) openPane(state.models[0].id);
  setStatus(`${state.models.filter((m) => m.id !== "auto").length} models`);
}

// For tests and for the curious: the same JSON the Copy button gives, per open pane.
window.lorachat = { conversationJSON: (i) => conversationJSON(state.panes[i]), state };
start();
