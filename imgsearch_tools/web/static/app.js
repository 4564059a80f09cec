// The search page: calls the door's JSON endpoints and draws results with DOM text nodes
// only (catalogue text is never parsed as HTML). A bearer token, when the server asks for
// one, is typed by the user and kept in this tab's sessionStorage: never in HTML or URLs.
"use strict";

const NEW_USER = "__new__";
const TOKEN_KEY = "imgsearch-token";
const state = { newUserId: "", lastQuery: "", imageUrls: [] };
const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function headers(json) {
  const out = {};
  if (json) out["Content-Type"] = "application/json";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) out["Authorization"] = "Bearer " + token;
  return out;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || "HTTP " + status);
    this.status = status;
    this.field = error.field || "";
    this.code = error.status || "";
  }
}

async function api(path, body) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401) $("token-box").hidden = false;
    throw new ApiError(response.status, data);
  }
  return data;
}

function randomId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function currentUser() {
  const value = $("user").value;
  if (value !== NEW_USER) return value;
  if (!state.newUserId) state.newUserId = "web-" + randomId();
  return state.newUserId;
}

function toast(message) {
  const box = $("toast");
  box.textContent = message;
  box.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => box.classList.remove("show"), 3500);
}

function fillSelect(select, names) {
  select.replaceChildren(...names.map((name) => el("option", { value: name }, name)));
}

async function loadChoices() {
  const choices = await api("/v1/choices");
  fillSelect($("retriever"), choices.retrievers);
  fillSelect($("ranker"), choices.rankers);
}

async function loadUsers() {
  const select = $("user");
  const keep = select.value;
  const { users } = await api("/v1/users?limit=30");
  const fixed = Array.from(select.options).slice(0, 2);
  const options = users.map((user) => {
    const tastes = user.top_keywords.length ? " · " + user.top_keywords.join(", ") : "";
    const label = `${user.user_id} (${user.conversions} conv.${tastes})`;
    return el("option", { value: user.user_id }, label);
  });
  const group = el("optgroup", { label: "Users with recent conversions" }, ...options);
  select.replaceChildren(...fixed, group);
  if (keep === NEW_USER && state.newUserId && users.some((u) => u.user_id === state.newUserId)) {
    select.value = state.newUserId;
  } else {
    select.value = Array.from(select.options).some((o) => o.value === keep) ? keep : "";
  }
}

function showStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function showTimings(reply, roundTripMs) {
  const t = reply.timings || {};
  const rows = [
    ["retrieval", t.retrieval_ms],
    ["ranking", t.ranking_ms],
    ["gateway total", t.total_ms],
    ["page round trip", roundTripMs],
  ];
  const box = $("timings");
  box.replaceChildren(
    ...rows.map(([name, ms]) =>
      el("div", {}, el("dt", {}, name), el("dd", {}, `${Number(ms || 0).toFixed(1)} ms`)),
    ),
  );
  box.hidden = false;
  const notes = (reply.notes || []).map((note) => el("li", {}, note));
  if (reply.degraded) {
    notes.unshift(el("li", { className: "degraded" }, "degraded: " + reply.degraded_reason));
  }
  $("notes").replaceChildren(...notes);
}

function releaseImages() {
  for (const url of state.imageUrls) URL.revokeObjectURL(url);
  state.imageUrls = [];
}

async function setImage(img, photoId) {
  const url = "/images/" + encodeURIComponent(photoId) + ".jpg";
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    img.src = url;
    return;
  }
  // Behind a token, an <img src> cannot send the header: fetch the bytes instead.
  const response = await fetch(url, { headers: headers(false) });
  if (!response.ok) throw new Error("HTTP " + response.status);
  const blobUrl = URL.createObjectURL(await response.blob());
  state.imageUrls.push(blobUrl);
  img.src = blobUrl;
}

function card(result, rank, query, user) {
  const photo = result.photo || {};
  const img = el("img", { alt: `photo ${result.photo_id}`, loading: "lazy" });
  const pick = el(
    "button",
    { className: "pick", type: "button", title: "Log a conversion of this photo" },
    img,
    el("span", { className: "rank" }, "#" + rank),
  );
  setImage(img, result.photo_id).catch(() => {
    pick.replaceChild(el("span", { className: "noimage" }, "no image"), img);
  });
  img.addEventListener("error", () => {
    if (img.isConnected) pick.replaceChild(el("span", { className: "noimage" }, "no image"), img);
  });
  const sources = Object.entries(result.retrieval_source_scores || {})
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([name, score]) => `${name} ${Number(score).toFixed(3)}`)
    .join(" · ");
  const item = el(
    "li",
    { className: "card", dataset: { photoId: result.photo_id } },
    pick,
    el(
      "div",
      { className: "meta" },
      el("span", { className: "id" }, result.photo_id),
      el(
        "span",
        { className: "scores" },
        el("span", { title: "final score" }, "score " + Number(result.score).toFixed(4)),
        el(
          "span",
          { title: "retrieval score" },
          "retr. " + Number(result.retrieval_score).toFixed(4),
        ),
      ),
      el("span", { className: "source", title: "retrieval source(s)" }, sources || result.retrieval_source),
      el("span", { className: "keywords" }, (photo.keywords || []).slice(0, 6).join(", ")),
      el("span", { className: "description" }, photo.description || photo.ai_description || ""),
    ),
  );
  pick.addEventListener("click", () => convert(item, result.photo_id, query, user));
  return item;
}

async function convert(item, photoId, query, user) {
  if (!user) {
    toast("Pick a user (or New user) to log conversions.");
    return;
  }
  const event = {
    event_id: `${user}-${photoId}-${randomId()}`,
    user_id: user,
    photo_id: photoId,
    query: query,
    converted_at: new Date().toISOString(),
  };
  try {
    const reply = await api("/v1/conversions", { events: [event] });
    const outcome = reply.results[0] || {};
    if (outcome.status === "EVENT_STATUS_REJECTED") {
      toast(`Not logged: ${outcome.detail}`);
      return;
    }
    item.classList.add("converted");
    item.querySelector(".pick").append(el("span", { className: "badge" }, "converted"));
    toast(`Logged ${photoId} for ${user}: search again to see the change.`);
    await loadUsers();
  } catch (error) {
    toast(`Not logged: ${error.message}`);
  }
}

async function search(event) {
  if (event) event.preventDefault();
  const query = $("query").value.trim();
  if (!query) {
    showStatus("Type a query first.", true);
    return;
  }
  const user = currentUser();
  const request = {
    query: query,
    user_id: user,
    k: Number($("k").value),
    retriever: "RETRIEVER_" + $("retriever").value.toUpperCase(),
    ranker: "RANKER_" + $("ranker").value.toUpperCase(),
  };
  if ($("retriever").value === "default") delete request.retriever;
  if ($("ranker").value === "default") delete request.ranker;
  showStatus("Searching…", false);
  const started = performance.now();
  let reply;
  try {
    reply = await api("/v1/search", request);
  } catch (error) {
    const where = error.field ? ` (field ${error.field})` : "";
    showStatus(`${error.code || "Error"}: ${error.message}${where}`, true);
    return;
  }
  const roundTrip = performance.now() - started;
  releaseImages();
  const ranker = reply.ranker.replace("RANKER_", "").toLowerCase();
  const retriever = reply.retriever.replace("RETRIEVER_", "").toLowerCase();
  showStatus(
    `${reply.results.length} results for “${query}” · user ${user || "anonymous"} · ` +
      `retriever ${retriever} · ranker ${ranker}`,
    false,
  );
  showTimings(reply, roundTrip);
  $("results").replaceChildren(
    ...reply.results.map((result, i) => card(result, i + 1, query, user)),
  );
  state.lastQuery = query;
}

function useToken() {
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  $("token-box").hidden = true;
  start();
}

async function start() {
  try {
    await loadChoices();
    await loadUsers();
    showStatus(
      "Type a query and press Enter. Click a photo to log a conversion for the selected " +
        "user; the next search shows what it changed.",
      false,
    );
  } catch (error) {
    showStatus(`Cannot load the page's choices: ${error.message}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", search);
  $("token-button").addEventListener("click", useToken);
  $("user").addEventListener("change", () => {
    if ($("user").value === NEW_USER) state.newUserId = "";
  });
  start();
});
