// The mmret search page: plain JavaScript, no build step, nothing fetched but this server's API.
// Text and ids go in the address (#q=..., #id=...), so Back and Forward replay searches.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, key: sessionStorage.getItem("mmret-key") || "", objectUrls: [], queryUrl: null };
const CAPTIONS_SHOWN = 3;  // the best few captions stay in view; the rest fold away so results stay above the fold

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["X-API-Key"] = state.key;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("key").focus();
  }
  if (!response.ok) throw new Error((body && body.error) || `the server answered ${response.status}`);
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function setStatus(text) { $("status").textContent = text; }

function plural(n, one, many) { return `${n.toLocaleString()} ${n === 1 ? one : many}`; }

// Media: a plain URL, or with an API key, fetched with the key and shown from a blob.
function loadMedia(element, url) {
  if (!state.key) { element.src = url; return; }
  fetch(url, { headers: headers() }).then((r) => (r.ok ? r.blob() : null)).then((blob) => {
    if (!blob) return;
    const local = URL.createObjectURL(blob);
    state.objectUrls.push(local);
    element.src = local;
  });
}

function releaseMedia() {
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
}

function mediaElement(hit) {
  const kind = state.info ? state.info.modality : "image";
  if (kind === "image" || kind === "audio") {  // a picture's thumbnail, a sound's spectrogram
    const img = document.createElement("img");
    const about = hit.captions && hit.captions.length ? hit.captions[0] : hit.id;
    img.alt = kind === "audio" ? `Spectrogram of ${about}` : about;
    img.loading = "lazy";
    img.decoding = "async";
    loadMedia(img, hit.thumbnail);
    return img;
  }
  const span = document.createElement("span");
  span.textContent = hit.id;
  return span;
}

// A sound's player sits outside the link, so its controls play it rather than open it.
function player(hit) {
  const audio = document.createElement("audio");
  audio.controls = true;
  audio.preload = "none";
  audio.setAttribute("aria-label", `Play ${hit.id}`);
  loadMedia(audio, hit.url);
  return audio;
}

function card(hit) {
  const li = document.createElement("li");
  li.className = "hit";
  li.dataset.id = hit.id;
  const link = document.createElement("a");
  link.className = "media";
  link.href = hit.url;
  link.target = "_blank";
  link.rel = "noopener";
  link.title = `Open ${hit.id}`;
  link.appendChild(mediaElement(hit));
  if (state.key) {
    link.addEventListener("click", (event) => {  // a new tab cannot send the key: open the loaded blob
      const media = link.querySelector("img, audio");
      if (media && media.src.startsWith("blob:")) { event.preventDefault(); window.open(media.src, "_blank"); }
    });
  }
  li.appendChild(link);
  if (state.info && state.info.modality === "audio") li.appendChild(player(hit));
  const body = document.createElement("div");
  body.className = "body";
  const meta = document.createElement("div");
  meta.className = "meta";
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = `#${hit.rank} ${hit.id}`;
  id.title = hit.id;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  score.title = "cosine similarity";
  meta.append(id, score);
  body.appendChild(meta);
  (hit.captions || []).slice(0, 2).forEach((text) => {
    const p = document.createElement("p");
    p.className = "caption";
    p.textContent = text;
    body.appendChild(p);
  });
  if (hit.captions && hit.captions.length > 2) body.lastChild.title = hit.captions.join("\n");
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more";
  more.textContent = "More like this";
  more.setAttribute("aria-label", `More like ${hit.id}`);
  more.addEventListener("click", () => go({ id: hit.id }));
  body.appendChild(more);
  li.appendChild(body);
  return li;
}

// Captions that differ only in case, spacing or punctuation ("A strawberry." and "a strawberry") are one
// suggestion: the best-scoring one, with how many items of the gallery carry it.
function captionKey(text) { return text.toLowerCase().replace(/[^\p{L}\p{N}]+/gu, " ").trim(); }

function uniqueCaptions(captions) {
  const seen = new Map();
  captions.forEach((c) => {
    const key = captionKey(c.caption);
    if (seen.has(key)) seen.get(key).count += 1;
    else seen.set(key, { caption: c.caption, score: c.score, count: 1 });
  });
  return [...seen.values()];
}

function captionItem(c) {
  const li = document.createElement("li");
  li.textContent = `${c.caption} `;
  if (c.count > 1) {
    const times = document.createElement("span");
    times.className = "times";
    times.textContent = `×${c.count} `;
    times.title = `${c.count} items of the gallery have this caption`;
    li.appendChild(times);
  }
  const s = document.createElement("span");
  s.className = "score";
  s.textContent = `(${c.score.toFixed(3)})`;
  li.appendChild(s);
  return li;
}

function renderCaptions(captions) {
  const unique = uniqueCaptions(captions);
  const rest = unique.slice(CAPTIONS_SHOWN);
  $("captions").replaceChildren(...unique.slice(0, CAPTIONS_SHOWN).map(captionItem));
  $("captions-rest").replaceChildren(...rest.map(captionItem));
  $("captions-rest").start = CAPTIONS_SHOWN + 1;
  $("more-captions").hidden = rest.length === 0;
  $("more-captions").open = false;
  $("more-captions").querySelector("summary").textContent = `${plural(rest.length, "more caption", "more captions")}`;
  $("captions-box").hidden = unique.length === 0;
}

// What a search started from, shown above the results: the uploaded file, or the gallery item of "more like this".
function showQuery(query) {
  if (state.queryUrl) { URL.revokeObjectURL(state.queryUrl); state.queryUrl = null; }
  const box = $("query-media");
  if (!query || query.text !== undefined) {
    box.replaceChildren();
    $("query-box").hidden = true;
    return;
  }
  const sound = state.info && state.info.modality === "audio";
  let media;
  if (query.file) {
    state.queryUrl = URL.createObjectURL(query.file);
    media = document.createElement(sound ? "audio" : "img");
    media.src = state.queryUrl;
    if (sound) media.controls = true;
    $("query-name").textContent = `Searching with ${query.file.name}`;
  } else {
    media = document.createElement("img");
    loadMedia(media, `/thumbnails/${encodeURIComponent(query.id)}`);
    $("query-name").textContent = `More like ${query.id}`;
  }
  if (!sound || !query.file) media.alt = $("query-name").textContent;
  box.replaceChildren(media);
  $("query-box").hidden = false;
}

function render(answer, label) {
  releaseMedia();
  const list = $("results");
  list.replaceChildren(...answer.results.map(card));
  renderCaptions(answer.captions || []);
  const noun = state.info ? [state.info.noun, `${state.info.noun}s`] : ["result", "results"];
  setStatus(`${plural(answer.results.length, noun[0], noun[1])} ${label} · ${answer.ms.toFixed(1)} ms in the server`);
  document.body.dataset.state = "done";
}

function k() { return parseInt($("k").value, 10) || 24; }

async function run(query) {
  showError("");
  document.body.dataset.state = "searching";
  setStatus("Searching…");
  try {
    showQuery(query);
    if (query.text !== undefined) {
      $("q").value = query.text;
      render(await api("/api/search", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: query.text, k: k() }) }), `for “${query.text}”`);
    } else if (query.id !== undefined) {
      render(await api("/api/search", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ id: query.id, k: k() }) }), `like ${query.id}`);
    }
  } catch (e) {
    document.body.dataset.state = "error";
    setStatus("");
    showError(e.message);
  }
}

async function upload(file) {
  if (!file) return;
  showError("");
  document.body.dataset.state = "searching";
  setStatus(`Searching with ${file.name}…`);
  showQuery({ file });
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("k", String(k()));
  try {
    render(await api("/api/search/upload", { method: "POST", body: form }), `like ${file.name}`);
    history.replaceState(null, "", location.pathname);
  } catch (e) {
    document.body.dataset.state = "error";
    setStatus("");
    showError(e.message);
  }
}

// The address holds the query: a new search is a new history entry, Back replays the last one.
function go(query) {
  const hash = query.text !== undefined ? `#q=${encodeURIComponent(query.text)}` : `#id=${encodeURIComponent(query.id)}`;
  if (location.hash === hash) run(query); else location.hash = hash;
  window.scrollTo({ top: 0 });
}

function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.has("q")) return { text: params.get("q") };
  if (params.has("id")) return { id: params.get("id") };
  return null;
}

async function loadInfo() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    showError(e.message);
    return;
  }
  const i = state.info;
  $("about").textContent = `${i.dataset} · ${plural(i.items, i.noun, `${i.noun}s`)}` +
    (i.captions ? ` · ${plural(i.captions, "caption", "captions")}` : "") + ` · run ${i.run} (${i.method})`;
  $("q").placeholder = `Describe a ${i.noun}, press Enter`;
  $("file-label").textContent = `Search with a ${i.noun}`;
  document.querySelectorAll(".noun").forEach((e) => { e.textContent = i.noun; });  // a sound page says sound
  $("file").accept = i.modality === "audio" ? "audio/*" : "image/*";
  $("k").value = [12, 24, 48, 96].includes(i.k) ? String(i.k) : $("k").value;
  const query = fromHash();
  if (query) run(query);
}

function setUp() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("q").value.trim();
    if (text) go({ text });
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value;
    sessionStorage.setItem("mmret-key", state.key);
    $("key-form").hidden = true;
    showError("");
    loadInfo();
  });
  $("file").addEventListener("change", () => upload($("file").files[0]));
  $("file-label").addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
  });
  window.addEventListener("hashchange", () => { const q = fromHash(); if (q) run(q); });
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (event.key === "/" && !typing) { event.preventDefault(); $("q").focus(); $("q").select(); }
  });
  let depth = 0;  // dragenter/dragleave fire for every child element crossed
  document.addEventListener("dragenter", (event) => { event.preventDefault(); depth += 1; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) $("drop").hidden = true; });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    if (event.dataTransfer.files.length) upload(event.dataTransfer.files[0]);
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
