// The page is a plain client of the public API: GET /model, POST /predict, POST /predict/batch.
"use strict";

const $ = (id) => document.getElementById(id);
let device = "unknown device";

// Turn an error response into a sentence a person can act on.
async function describeError(response) {
  let body = {};
  try { body = await response.json(); } catch { /* not JSON */ }
  const detail = body.detail || response.statusText || "unknown error";
  switch (response.status) {
    case 401:
      document.querySelector(".options").open = true;  // show the key field
      return "Wrong or missing API key: enter it under Options. (" + detail + ")";
    case 413: return "Too large: " + detail;
    case 415: return "Not an image: " + detail.replace(/^the file is not an image/, "it is not one");
    case 503: {
      const retry = response.headers.get("Retry-After");
      return "The server is busy or still loading" + (retry ? ", try again in " + retry + " s" : "") + ". (" + detail + ")";
    }
    case 504: return "The server took too long: " + detail;
    default: return "Error " + response.status + ": " + detail;
  }
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function loadModelInfo() {
  try {
    const response = await fetch("/model");
    if (!response.ok) { $("model-info").textContent = await describeError(response); return; }
    const info = await response.json();
    device = info.device + ", " + info.precision;
    const acc = info.accuracy.test == null ? "" : " · test accuracy " + info.accuracy.test.toFixed(2) + "%";
    $("model-info").textContent = "Model: " + info.architecture + " (recipe " + info.recipe + ")" + acc +
      " · running on " + device + " · classes: " + info.classes.join(", ");
  } catch (err) {
    $("model-info").textContent = "Cannot reach the server: " + err.message;
  }
}

function card(file) {
  const item = document.createElement("li");
  item.className = "card";
  item.innerHTML = '<div class="card-head"><img class="preview" alt=""><div><p class="label">…</p>' +
    '<p class="file-name"></p></div></div><div class="body" aria-live="polite"></div>';
  item.querySelector(".file-name").textContent = file.name;
  const img = item.querySelector(".preview");
  if (file.type.startsWith("image/")) {
    img.src = URL.createObjectURL(file);
    img.alt = "preview of " + file.name;
  } else {
    img.remove();
  }
  $("results").prepend(item);
  return item;
}

function showPrediction(item, prediction, ms) {
  item.querySelector(".label").textContent = prediction.label;
  const bars = document.createElement("ol");
  bars.className = "bars";
  bars.setAttribute("aria-label", "most likely classes");
  for (const score of prediction.top_k) {
    const row = document.createElement("li");
    const pct = (score.probability * 100).toFixed(1);
    row.innerHTML = '<span class="name"></span><span class="bar" role="presentation"><span></span></span><span class="prob"></span>';
    row.querySelector(".name").textContent = score.label;
    row.querySelector(".bar span").style.width = pct + "%";
    row.querySelector(".prob").textContent = pct + "%";
    row.setAttribute("aria-label", score.label + " " + pct + " percent");
    bars.append(row);
  }
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = "latency " + ms.toFixed(0) + " ms · " + device;
  item.querySelector(".body").replaceChildren(bars, meta);
}

function showError(item, message) {
  item.querySelector(".label").textContent = "—";
  const box = document.createElement("p");
  box.className = "error";
  box.setAttribute("role", "alert");
  box.textContent = message;
  item.querySelector(".body").replaceChildren(box);
}

async function classify(files) {
  if (!files.length) return;
  const topK = Math.min(10, Math.max(1, parseInt($("top-k").value, 10) || 5));
  const items = files.map(card);
  const form = new FormData();
  const single = files.length === 1;
  for (const file of files) form.append(single ? "file" : "files", file, file.name);
  $("status").textContent = "Classifying " + files.length + " image" + (single ? "" : "s") + "…";
  const start = performance.now();
  try {
    const response = await fetch((single ? "/predict" : "/predict/batch") + "?top_k=" + topK, {
      method: "POST", body: form, headers: headers(),
    });
    const ms = performance.now() - start;
    if (!response.ok) {
      const message = await describeError(response);
      items.forEach((item) => showError(item, message));
      $("status").textContent = message;
      return;
    }
    const body = await response.json();
    const results = single ? [{ prediction: body }] : body.results;
    results.forEach((result, i) => {
      if (result.prediction) showPrediction(items[i], result.prediction, ms);
      else showError(items[i], result.error.detail);
    });
    $("status").textContent = "Done in " + ms.toFixed(0) + " ms.";
  } catch (err) {
    const message = "Cannot reach the server: " + err.message;
    items.forEach((item) => showError(item, message));
    $("status").textContent = message;
  }
}

function setUp() {
  const zone = $("dropzone");
  const input = $("file-input");
  input.addEventListener("change", () => { classify([...input.files]); input.value = ""; });
  // The label is focusable; Enter or Space opens the file chooser, as a button would.
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    classify([...event.dataTransfer.files]);
  });
  $("options-form").addEventListener("submit", (event) => event.preventDefault());
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
