// The search page: an image (dropped or chosen) or a clicked result goes to POST /search; each neighbour's
// thumbnail comes from GET /thumbnail/{key}. Requests carry the token as a header, so thumbnails are fetched
// and shown from blob URLs rather than plain <img src> (which could not send it).
"use strict";

const $ = (id) => document.getElementById(id);
const token = $("token"), count = $("k"), statusLine = $("status"), drop = $("drop");

token.value = sessionStorage.getItem("barlow-token") || "";
token.addEventListener("change", () => sessionStorage.setItem("barlow-token", token.value.trim()));

function authHeaders() {
  const value = token.value.trim();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

// data-state on <body> (busy, done, error) tells a watcher, such as the browser test, when a search is over.
function setStatus(message, state) {
  statusLine.textContent = message;
  statusLine.className = state === "error" ? "error" : "";
  document.body.dataset.state = state;
}

// One line for a refused request: the server's JSON reason, plus what the user can do about it.
async function explain(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error) message = `${response.status}: ${body.error}`;
  } catch (_) { /* not JSON: the status line says enough */ }
  if (response.status === 401) message += " (enter the server's API token above)";
  if (response.status === 503) {
    const after = response.headers.get("Retry-After");
    message += ` (the server is busy; try again${after ? ` in ${after} s` : " shortly"})`;
  }
  return message;
}

async function loadThumbnail(img, key) {
  try {
    const response = await fetch(`/thumbnail/${encodeURIComponent(key)}`, { headers: authHeaders() });
    if (!response.ok) throw new Error(await explain(response));
    img.src = URL.createObjectURL(await response.blob());
    await img.decode();
  } catch (error) {
    img.alt = `no thumbnail: ${error.message}`;
    img.classList.add("missing");
  }
}

function caption(parts) {
  const figcaption = document.createElement("figcaption");
  for (const [text, cls] of parts) {
    const line = document.createElement("div");
    line.textContent = text;
    if (cls) line.className = cls;
    figcaption.append(line);
  }
  return figcaption;
}

function describe(hit) {
  const parts = [[hit.key, "key"], [`score ${hit.score.toFixed(3)}`, "score"]];
  if (hit.label !== null && hit.label !== undefined) parts.push([`label ${hit.label}`, "label"]);
  return parts;
}

async function show(queryText, neighbours) {
  const list = $("neighbours");
  list.replaceChildren();
  $("query-caption").replaceChildren(...caption([[queryText, "key"]]).childNodes);
  const loads = neighbours.map((hit, rank) => {
    const item = document.createElement("li");
    item.dataset.key = hit.key;
    item.dataset.rank = String(rank + 1);
    item.title = `search by ${hit.key}`;
    const img = document.createElement("img");
    img.alt = hit.key;
    item.append(img, caption(describe(hit)));
    item.addEventListener("click", () => searchByKey(hit.key));
    list.append(item);
    return loadThumbnail(img, hit.key);
  });
  $("view").hidden = false;
  await Promise.all(loads);
}

async function search(url, options, queryText) {
  setStatus("searching…", "busy");
  let response;
  try {
    response = await fetch(url, { method: "POST", headers: authHeaders(), ...options });
  } catch (error) {
    setStatus(`the server did not answer (${error.message})`, "error");
    return;
  }
  if (!response.ok) {
    setStatus(await explain(response), "error");
    return;
  }
  const body = await response.json();
  const neighbours = body.results[0].neighbours;
  await show(queryText, neighbours);
  setStatus(`${neighbours.length} neighbours of ${queryText} (${body.model})`, "done");
}

function neighbourCount() {
  return Math.max(1, Math.min(100, parseInt(count.value, 10) || 12));
}

async function searchByImage(file) {
  if (!file) return;
  const query = $("query-image");
  query.classList.remove("missing");
  query.src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("images", file, file.name);
  await search(`/search?k=${neighbourCount()}`, { body: form }, file.name);
}

async function searchByKey(key) {
  const query = $("query-image");
  query.classList.remove("missing");
  query.removeAttribute("src");
  loadThumbnail(query, key);
  await search(`/search?key=${encodeURIComponent(key)}&k=${neighbourCount()}`, {}, key);
}

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  event.target.value = "";  // so that choosing the same file again searches again
  searchByImage(file);
});
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  searchByImage(event.dataTransfer.files[0]);
});
