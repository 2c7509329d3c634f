// The search page: a thin client of the HTTP API (POST /search, GET /items/…). No build step.
"use strict";

const PAGE = 24;
const $ = (selector) => document.querySelector(selector);
const state = { text: "", image: null, imageName: "", item: null, modality: "image", offset: 0 };
const objectUrls = [];

// Every call carries the token the user gave, if the server asked for one (kept in this browser only).
async function api(path, options = {}) {
  const token = localStorage.getItem("clipseek-token");
  const headers = { ...(options.headers || {}), ...(token ? { Authorization: `Bearer ${token}` } : {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    const given = prompt("This server needs a token:");
    if (given) {
      localStorage.setItem("clipseek-token", given.trim());
      return api(path, options);
    }
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (_) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return response;
}

async function blobUrl(path) {
  const url = URL.createObjectURL(await (await api(path)).blob());
  objectUrls.push(url);
  return url;
}

function query() {
  const body = { modality: state.modality, k: PAGE, offset: state.offset };
  if (state.item !== null) body.item = state.item;
  if (state.image) body.image = state.image;
  if (state.text) body.text = state.text;
  return body;
}

async function search() {
  const body = query();
  if (body.item === undefined && !body.image && !body.text) return;
  const params = new URLSearchParams({ q: state.text, modality: state.modality, offset: state.offset });
  if (!state.image && state.item === null) history.replaceState(null, "", `?${params}`);
  $("#status").textContent = "searching…";
  try {
    const response = await api("/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    show(await response.json());
  } catch (error) {
    $("#status").textContent = error.message;
    $("#results").replaceChildren();
    $("#pager").hidden = true;
  }
}

function show(answer) {
  objectUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  const first = answer.offset + 1;
  $("#status").textContent = answer.hits.length
    ? `results ${first}–${answer.offset + answer.hits.length}`
    : "no results";
  $("#results").replaceChildren(...answer.hits.map(card));
  $("#pager").hidden = answer.offset === 0 && answer.hits.length < PAGE;
  $("#previous").disabled = answer.offset === 0;
  $("#next").disabled = answer.hits.length < PAGE;
  $("#page").textContent = `page ${Math.floor(answer.offset / PAGE) + 1}`;
}

function card(hit) {
  const element = document.createElement("button");
  element.className = "hit";
  element.dataset.id = hit.id;
  element.dataset.score = hit.score.toFixed(3);
  const meta = document.createElement("div");
  meta.className = "meta";
  const name = document.createElement("span");
  name.className = "name";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  if (hit.modality === "image") {
    element.dataset.path = hit.path;
    const image = document.createElement("img");
    image.alt = hit.path;
    blobUrl(`/items/${hit.id}/thumbnail`).then((url) => { image.src = url; }, () => { image.alt = "missing"; });
    name.textContent = hit.path.split("/").pop();
    name.title = hit.path;
    element.append(image);
  } else {
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = hit.caption;
    name.textContent = hit.collection || "";
    element.append(caption);
  }
  meta.append(name, score);
  element.append(meta);
  element.addEventListener("click", () => detail(hit));
  return element;
}

async function detail(hit) {
  const dialog = $("#detail");
  const image = $("#detail-image");
  image.hidden = hit.modality !== "image";
  image.removeAttribute("src");
  const item = await (await api(`/items/${hit.id}`)).json();
  const rows = { id: item.id, score: hit.score.toFixed(4), path: item.path, caption: item.caption,
                 collection: item.collection, ...item.metadata };
  $("#detail-metadata").replaceChildren(...Object.entries(rows).filter(([, v]) => v !== null && v !== undefined)
    .flatMap(([key, value]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = key;
      dd.textContent = String(value);
      return [dt, dd];
    }));
  $("#more-like-this").onclick = () => {
    dialog.close();
    Object.assign(state, { item: hit.id, image: null, text: "", offset: 0 });
    $("#text").value = "";
    search();
  };
  dialog.showModal();
  if (hit.modality === "image") image.src = await blobUrl(`/items/${hit.id}/image`);
}

function usePicture(file) {
  if (!file || !file.type.startsWith("image/")) {
    $("#status").textContent = "that is not a picture";
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result.split(",", 2)[1];
    state.item = null;
    state.offset = 0;
    $("#query-image img").src = reader.result;
    $("#query-image span").textContent = file.name;
    $("#query-image").hidden = false;
    search();
  };
  reader.readAsDataURL(file);
}

$("#search").addEventListener("submit", (event) => {
  event.preventDefault();
  Object.assign(state, { text: $("#text").value.trim(), modality: $("#modality").value, item: null, offset: 0 });
  search();
});
$("#modality").addEventListener("change", () => { state.modality = $("#modality").value; state.offset = 0; search(); });
$("#file").addEventListener("change", (event) => usePicture(event.target.files[0]));
$("#clear-image").addEventListener("click", () => {
  state.image = null;
  $("#query-image").hidden = true;
  $("#file").value = "";
});
$("#previous").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); search(); });
$("#next").addEventListener("click", () => { state.offset += PAGE; search(); });

// Drag and drop anywhere on the page.
let dragDepth = 0;
document.addEventListener("dragenter", (event) => { event.preventDefault(); dragDepth++; $("#drop").hidden = false; });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; $("#drop").hidden = true; } });
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  $("#drop").hidden = true;
  usePicture(event.dataTransfer.files[0]);
});

// A query in the address (?q=…) runs on load, so a search can be bookmarked or shared.
const params = new URLSearchParams(location.search);
if (params.get("q")) {
  $("#text").value = params.get("q");
  $("#modality").value = params.get("modality") === "text" ? "text" : "image";
  Object.assign(state, { text: params.get("q"), modality: $("#modality").value, offset: Number(params.get("offset")) || 0 });
  search();
}
