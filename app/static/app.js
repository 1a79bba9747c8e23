// The page of iwae-service: a client of the public REST API and nothing else.
// Jobs: GET /jobs, POST /train (its form built from /openapi.json), POST /jobs/{id}/cancel,
// GET /jobs/{id}/events. Models: GET /models, GET /samples. Try it: POST /reconstruct,
// POST /loglik. Errors are the API's own messages; with IWAE_API_TOKEN set, the first 401
// asks for the token, kept for this tab only (sessionStorage).
"use strict";

const $ = (selector) => document.querySelector(selector);
const VIEWS = ["jobs", "studies", "models", "try"];
const MAIN_FIELDS = ["k", "objective", "epochs"]; // the rest of POST /train under "More options"
const JOB_LIMIT = 50;
const MODEL_LIMIT = 100; // the first page of GET /models
const STUDY_LIMIT = 20;
const LIST_REFRESH_MS = 5000;
const MAX_STREAMS = 3; // browsers allow 6 connections per server over HTTP/1.1
const TOKEN_KEY = "iwae-api-token";

const state = {
  view: null, // the view shown: one of VIEWS
  trainSchema: null, // TrainRequest from /openapi.json
  jobs: new Map(), // job_id -> { job, element, losses: [[x, loss]] }
  streams: new Map(), // job_id -> EventSource
  models: [], // GET /models, newest first
  modelsKey: null, // the ids of the models shown, to redraw only when they change
  padSource: null, // the uploaded File, or null when the canvas holds the digit
};

// ---------------------------------------------------------------- API calls and errors

class ApiError extends Error {
  constructor(message, fields = {}) {
    super(message);
    this.fields = fields; // field name -> message, from a 422's `loc`
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// Text with `code` spans, as the API's descriptions are written.
function richText(text) {
  const span = el("span");
  text.split("`").forEach((part, i) => span.append(i % 2 ? el("code", { text: part }) : part));
  return span;
}

function fieldLabel(name) {
  const prop = state.trainSchema?.properties?.[name];
  return prop?.title ?? name;
}

async function apiError(response) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch {
    // not JSON: fall back on the status line
  }
  if (typeof detail === "string") return new ApiError(detail);
  if (Array.isArray(detail)) {
    const fields = {};
    const lines = detail.map((item) => {
      const name = String(item.loc?.[item.loc.length - 1] ?? "request");
      fields[name] = item.msg;
      return `${fieldLabel(name)}: ${item.msg}`;
    });
    return new ApiError(lines.join("\n"), fields);
  }
  return new ApiError(`the server answered ${response.status} ${response.statusText}`);
}

// fetch() with the API's errors as ApiError; `auth` calls ask for the token on a 401.
async function api(path, { method = "GET", json, form, auth = false } = {}) {
  let why = "This server needs a token (IWAE_API_TOKEN) to queue or cancel jobs.";
  for (;;) {
    const headers = {};
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (auth && token) headers.Authorization = `Bearer ${token}`;
    let response;
    try {
      response = await fetch(path, { method, headers, body });
    } catch {
      throw new ApiError("the server cannot be reached: is it still running?");
    }
    if (response.ok) return response;
    if (response.status === 401 && auth) {
      if (token) why = "The server refused this token; check it and try again.";
      if (await askToken(why)) continue;
    }
    throw await apiError(response);
  }
}

function askToken(why) {
  const dialog = $("#token-dialog");
  $("#token-why").textContent = `${why} It is kept in this browser tab only.`;
  $("#token-input").value = "";
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const token = $("#token-input").value.trim();
        const saved = dialog.returnValue === "save" && token !== "";
        if (saved) sessionStorage.setItem(TOKEN_KEY, token);
        resolve(saved);
      },
      { once: true },
    );
  });
}

function showMessage(target, text, { error = false } = {}) {
  const box = $(target);
  box.classList.toggle("error", error);
  box.textContent = "";
  const lines = text.split("\n");
  if (lines.length > 1) box.append(el("ul", {}, ...lines.map((line) => el("li", { text: line }))));
  else box.textContent = text;
}

// ---------------------------------------------------------------- formatting

const number = (value, digits = 0) =>
  value.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });

function duration(seconds) {
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

const time = (iso) => (iso ? new Date(iso).toLocaleString() : "");

function describeConfig(config) {
  const parts = [`${config.objective.toUpperCase()}, K=${config.k}`];
  if (config.m > 1) parts.push(`M=${config.m}`);
  parts.push(`${config.epochs} epoch${config.epochs === 1 ? "" : "s"}`);
  return parts.join(", ");
}

function describeMetrics(metrics) {
  if (!metrics) return "";
  const parts = [];
  if (metrics.test_loglik != null) {
    parts.push(
      `test log-likelihood ${number(metrics.test_loglik, 2)} ± ${number(metrics.test_loglik_std_error ?? 0, 2)} nats` +
        ` (K=${number(metrics.eval_k)}, ${number(metrics.eval_size)} test images)`,
    );
  } else {
    parts.push("not evaluated on the test set (eval_size 0)");
  }
  if (metrics.active_units) parts.push(`active units ${metrics.active_units.join(" + ")}`);
  if (metrics.train_seconds != null) parts.push(`trained in ${duration(metrics.train_seconds)}`);
  return parts.join(" · ");
}

// ---------------------------------------------------------------- views

// The view named by the URL's #fragment. Sections are "view-<name>", so that the browser has
// no element to scroll to; other fragments (the skip link's #main) keep the current view.
function showView({ focus = false } = {}) {
  const name = location.hash.slice(1);
  const current = VIEWS.includes(name) ? name : (state.view ?? "jobs");
  state.view = current;
  for (const view of VIEWS) $(`#view-${view}`).hidden = view !== current;
  for (const link of document.querySelectorAll("nav a[href^='#']")) {
    if (link.getAttribute("href") === `#${current}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (focus && VIEWS.includes(name)) $(`#${current}-title`).focus();
}

// ---------------------------------------------------------------- the training form

function nullable(prop) {
  return Array.isArray(prop.anyOf) && prop.anyOf.some((option) => option.type === "null");
}

function trainField(name, prop, required) {
  const id = `train-${name}`;
  const hintId = `${id}-hint`;
  const errorId = `${id}-error`;
  const inner = nullable(prop) ? prop.anyOf.find((option) => option.type !== "null") : prop;
  let control;
  if (inner.enum) {
    control = el("select", { id, name });
    for (const option of inner.enum) control.append(el("option", { value: String(option), text: String(option) }));
  } else {
    const numeric = inner.type === "integer" ? "numeric" : "decimal";
    control = el("input", { id, name, type: "text", inputMode: numeric, autocomplete: "off" });
  }
  const initial = prop.default ?? (required ? prop.examples?.[0] : undefined);
  if (initial !== undefined && initial !== null) {
    if (control.tagName === "SELECT") {
      for (const option of control.options) option.defaultSelected = option.value === String(initial);
    } else {
      control.defaultValue = String(initial);
    }
  }
  let hint = prop.description ?? "";
  if (nullable(prop)) hint = hint.replace(/null:/, "empty:");
  control.setAttribute("aria-describedby", `${hintId} ${errorId}`);
  if (required) control.required = true;
  return el(
    "div",
    { class: "field" },
    el("label", { htmlFor: id, text: prop.title ?? name }),
    control,
    el("p", { class: "field-error", id: errorId }),
    el("p", { class: "hint", id: hintId }, richText(hint)),
  );
}

async function buildTrainForm() {
  const spec = await (await api("/openapi.json")).json();
  const schema = spec.components.schemas.TrainRequest;
  state.trainSchema = schema;
  const required = new Set(schema.required ?? []);
  for (const [name, prop] of Object.entries(schema.properties)) {
    const box = MAIN_FIELDS.includes(name) ? $("#train-main") : $("#train-more");
    box.append(trainField(name, prop, required.has(name)));
  }
}

// The form's values as POST /train's body: numbers where the text is one, everything else
// as typed (the API says what is wrong with it); an empty field leaves the API's default.
function trainBody(form) {
  const body = {};
  for (const [name, prop] of Object.entries(state.trainSchema.properties)) {
    const value = form.elements[name].value.trim();
    if (value === "") continue;
    const inner = nullable(prop) ? prop.anyOf.find((option) => option.type !== "null") : prop;
    const isNumber = inner.type === "integer" || inner.type === "number";
    body[name] = isNumber && Number.isFinite(Number(value)) ? Number(value) : value;
  }
  return body;
}

function markFields(form, fields) {
  for (const name of Object.keys(state.trainSchema.properties)) {
    const control = form.elements[name];
    const message = fields[name] ?? "";
    control.setAttribute("aria-invalid", message ? "true" : "false");
    $(`#train-${name}-error`).textContent = message;
  }
  const first = Object.keys(fields).find((name) => form.elements[name]);
  if (first) {
    const control = form.elements[first];
    control.closest("details")?.setAttribute("open", "");
    control.focus();
  }
}

async function submitTraining(event) {
  event.preventDefault();
  const form = event.target;
  const button = $("#train-submit");
  button.disabled = true;
  showMessage("#train-message", "Queuing…");
  try {
    const job = await (await api("/train", { method: "POST", json: trainBody(form), auth: true })).json();
    markFields(form, {});
    showMessage("#train-message", `Queued job ${job.job_id.slice(0, 8)}: ${describeConfig(job.config)}.`);
    updateJob(job);
    watch(job.job_id);
  } catch (error) {
    markFields(form, error.fields ?? {});
    showMessage("#train-message", `The job was not queued. ${error.message}`, { error: true });
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- jobs

function jobElement(jobId) {
  const short = jobId.slice(0, 8);
  const cancel = el("button", { type: "button", class: "secondary cancel", text: "Cancel" });
  cancel.setAttribute("aria-label", `Cancel job ${short}`);
  cancel.addEventListener("click", () => cancelJob(jobId, cancel));
  const bar = el("progress", { max: 1, value: 0 });
  bar.setAttribute("aria-label", `Progress of job ${short}`);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "loss");
  svg.setAttribute("viewBox", "0 0 100 30");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true"); // the caption says what it shows
  svg.append(document.createElementNS("http://www.w3.org/2000/svg", "polyline"));
  const curve = el("figure", { class: "loss-curve" }, svg, el("figcaption"));
  return el(
    "li",
    { class: "card job", "data-job-id": jobId },
    el(
      "div",
      { class: "card-head" },
      el("h4", { class: "job-title" }),
      el("span", { class: "badge" }),
    ),
    el("p", { class: "meta job-meta" }),
    el("div", { class: "job-progress" }, bar, el("p", { class: "job-stats" }), curve),
    el("p", { class: "job-result" }),
    el("p", { class: "job-error" }),
    cancel,
  );
}

// The loss is measured every few dozen steps; between two measurements, the last one stands.
function progressText(progress, losses) {
  if (!progress) return "";
  const parts = [];
  if (progress.phase === "eval") {
    parts.push(`evaluating: ${number(progress.step)} of ${number(progress.steps)} test images`);
  } else if (progress.phase === "impute") {
    parts.push(`imputing top halves: ${number(progress.step)} of ${number(progress.steps)}`);
  } else if (progress.phase === "snr") {
    parts.push(`gradient SNR: ${number(progress.step)} of ${number(progress.steps)} draws`);
  } else {
    parts.push(`epoch ${progress.epoch} of ${progress.epochs}, step ${progress.step} of ${progress.steps}`);
    const loss = progress.loss ?? losses[losses.length - 1]?.[1];
    if (loss != null) parts.push(`loss ${number(loss, 1)} nats`);
  }
  if (progress.images_per_s != null) parts.push(`${number(progress.images_per_s)} images/s`);
  if (progress.eta_s != null) parts.push(`about ${duration(progress.eta_s)} left`);
  return parts.join(" · ");
}

function fraction(progress) {
  if (!progress || !progress.steps) return 0;
  if (progress.phase !== "train") return progress.step / progress.steps;
  return ((progress.epoch - 1) * progress.steps + progress.step) / (progress.epochs * progress.steps);
}

function drawLoss(figure, losses) {
  const svg = figure.querySelector("svg");
  const line = svg.querySelector("polyline");
  figure.hidden = losses.length < 2;
  if (losses.length < 2) return;
  const xs = losses.map(([x]) => x);
  const ys = losses.map(([, y]) => y);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const points = losses.map(([x, y]) => {
    const px = x1 > x0 ? ((x - x0) / (x1 - x0)) * 100 : 0;
    const py = y1 > y0 ? 28 - ((y - y0) / (y1 - y0)) * 26 : 15;
    return `${px.toFixed(2)},${py.toFixed(2)}`;
  });
  line.setAttribute("points", points.join(" "));
  figure.querySelector("figcaption").textContent =
    `Training loss while this page watched: ${number(ys[0], 1)} → ${number(ys[ys.length - 1], 1)} nats ` +
    `(steps ${number(x0)} to ${number(x1)})`;
}

function updateJob(job) {
  let entry = state.jobs.get(job.job_id);
  if (!entry) {
    entry = { job, element: jobElement(job.job_id), losses: [] };
    state.jobs.set(job.job_id, entry);
  }
  const wasFinished = ["succeeded", "failed", "cancelled"].includes(entry.job.status);
  if (Date.parse(job.updated_at) < Date.parse(entry.job.updated_at)) return; // an older answer
  entry.job = job;
  const node = entry.element;
  const progress = job.progress;
  if (progress?.phase === "train" && progress.loss != null) {
    const x = (progress.epoch - 1) * progress.steps + progress.step;
    const last = entry.losses[entry.losses.length - 1];
    if (!last || x > last[0]) entry.losses.push([x, progress.loss]);
  }
  const finished = ["succeeded", "failed", "cancelled"].includes(job.status);
  node.querySelector(".job-title").textContent = describeConfig(job.config);
  const badge = node.querySelector(".badge");
  badge.className = `badge ${job.status}`;
  badge.textContent = job.cancel_requested && !finished ? `${job.status}, cancelling` : job.status;
  node.querySelector(".job-meta").replaceChildren(
    "job ",
    el("code", { text: job.job_id.slice(0, 8) }),
    ` · queued ${time(job.created_at)}`,
    job.finished_at ? ` · ended ${time(job.finished_at)}` : "",
  );
  const bar = node.querySelector("progress");
  bar.value = job.status === "succeeded" ? 1 : fraction(progress);
  node.querySelector(".job-progress").hidden = !progress && job.status !== "succeeded";
  node.querySelector(".job-stats").textContent = finished ? "" : progressText(progress, entry.losses);
  drawLoss(node.querySelector(".loss-curve"), entry.losses);
  node.querySelector(".job-result").textContent = job.status === "succeeded" ? describeMetrics(job.metrics) : "";
  node.querySelector(".job-error").textContent = job.error ?? "";
  node.querySelector(".cancel").hidden = finished;
  renderJobList();
  if (finished && !wasFinished && job.status === "succeeded") loadModels();
}

function renderJobList() {
  const entries = [...state.jobs.values()].sort((a, b) => (a.job.created_at < b.job.created_at ? 1 : -1));
  const list = $("#job-list");
  entries.slice(0, JOB_LIMIT).forEach((entry, i) => {
    if (list.children[i] !== entry.element) list.insertBefore(entry.element, list.children[i] ?? null);
  });
  while (list.children.length > Math.min(entries.length, JOB_LIMIT)) list.lastElementChild.remove();
  $("#jobs-empty").hidden = entries.length > 0;
}

// Live progress of a job, by server-sent events, until it ends.
function watch(jobId) {
  if (state.streams.has(jobId) || state.streams.size >= MAX_STREAMS) return;
  const source = new EventSource(`/jobs/${encodeURIComponent(jobId)}/events`);
  state.streams.set(jobId, source);
  const stop = () => {
    source.close();
    state.streams.delete(jobId);
  };
  source.addEventListener("job", (event) => updateJob(JSON.parse(event.data)));
  source.addEventListener("end", stop);
  // The server's `event: error` carries data; a dropped connection does not, and EventSource
  // reconnects by itself unless the server refused it (then it is CLOSED).
  source.addEventListener("error", (event) => {
    if (event.data !== undefined || source.readyState === EventSource.CLOSED) stop();
  });
}

async function refreshJobs() {
  try {
    const { jobs } = await (await api(`/jobs?limit=${JOB_LIMIT}`)).json();
    for (const job of jobs) {
      updateJob(job);
      if (job.status === "running") watch(job.job_id);
    }
    showMessage("#jobs-message", "");
  } catch (error) {
    showMessage("#jobs-message", `Jobs could not be loaded: ${error.message}`, { error: true });
  }
}

async function cancelJob(jobId, button) {
  button.disabled = true;
  try {
    updateJob(await (await api(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", auth: true })).json());
    showMessage("#jobs-message", `Cancel requested for job ${jobId.slice(0, 8)}.`);
  } catch (error) {
    showMessage("#jobs-message", `Job ${jobId.slice(0, 8)} was not cancelled: ${error.message}`, { error: true });
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- studies

const words = (text) => text.trim().split(/[\s,]+/).filter(Boolean);

function studyBody(form) {
  const numbers = (name) => words(form.elements[name].value).map(Number);
  const body = {
    ks: numbers("ks"),
    objectives: words(form.elements.objectives.value),
    seeds: numbers("seeds"),
    epochs: Number(form.elements.epochs.value),
  };
  for (const name of ["train_size", "eval_size"]) {
    if (form.elements[name].value !== "") body[name] = Number(form.elements[name].value);
  }
  return body;
}

async function submitStudy(event) {
  event.preventDefault();
  const button = $("#study-submit");
  button.disabled = true;
  try {
    const study = await (await api("/studies", { method: "POST", json: studyBody(event.target), auth: true })).json();
    showMessage("#study-message", `Queued study ${study.study_id.slice(0, 8)}: ${study.cells.length} training jobs.`);
    await Promise.all([refreshStudies(), refreshJobs()]);
  } catch (error) {
    showMessage("#study-message", `The study was not queued: ${error.message}`, { error: true });
  } finally {
    button.disabled = false;
  }
}

function studyCard(study) {
  const base = `/studies/${encodeURIComponent(study.study_id)}`;
  const short = study.study_id.slice(0, 8);
  const counts = Object.entries(study.cells).map(([status, n]) => `${n} ${status}`).join(", ");
  const links = el("p", { class: "study-links" }, el("a", { href: `${base}/results.json`, text: "results.json" }));
  if (study.cells.succeeded) {
    links.prepend(el("a", { href: `${base}/report`, target: "_blank", rel: "noopener", text: "Report" }), " · ");
  }
  const card = el(
    "li",
    { class: "card study", "data-study-id": study.study_id },
    el(
      "div",
      { class: "card-head" },
      el("h4", { text: `Study ${short}` }),
      el("span", { class: `badge ${study.status}`, text: study.status }),
    ),
    el("p", {
      class: "meta",
      text: `K ${study.ks.join(", ")} · ${study.objectives.join(", ")} · seeds ${study.seeds.join(", ")} · ${time(study.created_at)}`,
    }),
    el("p", { class: "study-cells", text: `Cells: ${counts}` }),
    links,
  );
  if (["queued", "running"].includes(study.status)) {
    const cancel = el("button", { type: "button", class: "secondary cancel", text: "Cancel" });
    cancel.setAttribute("aria-label", `Cancel study ${short}`);
    cancel.addEventListener("click", () => cancelStudy(study.study_id, cancel));
    card.append(cancel);
  }
  return card;
}

async function refreshStudies() {
  try {
    const { studies } = await (await api(`/studies?limit=${STUDY_LIMIT}`)).json();
    $("#study-list").replaceChildren(...studies.map(studyCard));
    $("#studies-empty").hidden = studies.length > 0;
    showMessage("#studies-message", "");
  } catch (error) {
    showMessage("#studies-message", `Studies could not be loaded: ${error.message}`, { error: true });
  }
}

async function cancelStudy(studyId, button) {
  button.disabled = true;
  try {
    await api(`/studies/${encodeURIComponent(studyId)}/cancel`, { method: "POST", auth: true });
    showMessage("#studies-message", `Cancel requested for study ${studyId.slice(0, 8)}.`);
    await refreshStudies();
  } catch (error) {
    showMessage("#studies-message", `Study ${studyId.slice(0, 8)} was not cancelled: ${error.message}`, { error: true });
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- models

const randomSeed = () => Math.floor(Math.random() * 2 ** 31);

function samplesUrl(modelId, n, seed) {
  return `/samples?${new URLSearchParams({ model_id: modelId, n, seed })}`;
}

function modelName(model) {
  return `${describeConfig(model.config)} · ${model.model_id.slice(0, 8)}`;
}

function modelCard(model) {
  const img = el("img", { class: "digits", width: 244, height: 244, loading: "lazy" }); // 2x
  const caption = el("figcaption");
  const show = (seed) => {
    img.src = samplesUrl(model.model_id, 16, seed);
    img.alt = `16 digits drawn from model ${model.model_id.slice(0, 8)}, seed ${seed}`;
    caption.textContent = `16 samples, seed ${seed}`;
  };
  const again = el("button", { type: "button", class: "secondary", text: "New samples" });
  again.setAttribute("aria-label", `New samples from model ${model.model_id.slice(0, 8)}`);
  again.addEventListener("click", () => show(randomSeed()));
  show(0);
  return el(
    "li",
    { class: "card model", "data-model-id": model.model_id },
    el("div", { class: "card-head" }, el("h4", { text: describeConfig(model.config) })),
    el("p", { class: "meta" }, "model ", el("code", { text: model.model_id }), ` · ${time(model.created_at)}`),
    el("p", { class: "model-metrics", text: describeMetrics(model.metrics) }),
    el("div", { class: "samples" }, el("figure", {}, img, caption), again),
  );
}

function fillSelect(select, models, preferred) {
  const previous = select.value;
  select.replaceChildren(...models.map((m) => el("option", { value: m.model_id, text: modelName(m) })));
  const keep = models.some((m) => m.model_id === previous) ? previous : preferred;
  if (keep) select.value = keep;
}

function showComparison(seed) {
  for (const side of ["a", "b"]) {
    const select = $(`#compare-${side}`);
    const model = state.models.find((m) => m.model_id === select.value);
    if (!model) continue;
    const img = $(`#compare-img-${side}`);
    img.src = samplesUrl(model.model_id, 64, seed);
    img.alt = `64 digits drawn from ${modelName(model)}`;
    $(`#compare-cap-${side}`).textContent = `${modelName(model)}, seed ${seed}`;
  }
}

async function loadModels() {
  try {
    const { models } = await (await api(`/models?limit=${MODEL_LIMIT}`)).json();
    const key = models.map((m) => m.model_id).join();
    if (key === state.modelsKey) return;
    state.models = models;
    state.modelsKey = key;
    $("#models-empty").hidden = models.length > 0;
    $("#compare-block").hidden = models.length < 2;
    $("#model-list").replaceChildren(...models.map(modelCard));
    fillSelect($("#try-model"), models, models[0]?.model_id);
    $("#try-no-model").hidden = models.length > 0;
    if (models.length >= 2) {
      fillSelect($("#compare-a"), models, models[1].model_id);
      fillSelect($("#compare-b"), models, models[0].model_id);
      showComparison(0);
    }
    showMessage("#models-message", "");
  } catch (error) {
    showMessage("#models-message", `Models could not be loaded: ${error.message}`, { error: true });
  }
}

// ---------------------------------------------------------------- try it

const pad = () => $("#pad");

function clearPad() {
  const canvas = pad();
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  state.padSource = null;
}

function setUpPad() {
  const canvas = pad();
  const ctx = canvas.getContext("2d");
  let last = null;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [
      ((event.clientX - box.left) * canvas.width) / box.width,
      ((event.clientY - box.top) * canvas.height) / box.height,
    ];
  };
  const stroke = (from, to) => {
    ctx.strokeStyle = "#000000";
    ctx.lineWidth = canvas.width / 14; // a pen stroke as thick as MNIST's
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
  };
  canvas.addEventListener("pointerdown", (event) => {
    if (state.padSource) {
      clearPad(); // drawing replaces an uploaded picture
      $("#upload").value = "";
    }
    canvas.setPointerCapture(event.pointerId);
    last = at(event);
    stroke(last, last);
    event.preventDefault();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const each of events.length ? events : [event]) {
      const point = at(each);
      stroke(last, point);
      last = point;
    }
  });
  for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
    canvas.addEventListener(type, () => {
      last = null;
    });
  }
  $("#pad-clear").addEventListener("click", () => {
    clearPad();
    $("#upload").value = "";
  });
  $("#upload").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    clearPad();
    state.padSource = file;
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const [w, h] = [bitmap.width * scale, bitmap.height * scale];
      ctx.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
    } catch {
      showMessage("#try-message", "This browser cannot preview the file; the server will read it when you score.");
    }
  });
  clearPad();
}

function drawDigit(canvas, values) {
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(28, 28);
  values.forEach((v, i) => {
    const grey = Math.round(Math.min(1, Math.max(0, v)) * 255);
    image.data.set([grey, grey, grey, 255], i * 4);
  });
  ctx.putImageData(image, 0, 0);
}

const SUPERSCRIPT = "⁰¹²³⁴⁵⁶⁷⁸⁹";

// e^nats as a factor a person can read: 4.2, 480,000, 10¹⁹.
function timesInWords(nats) {
  const ratio = Math.exp(nats);
  if (ratio < 10) return number(ratio, 1);
  if (ratio < 1e6) return Number(ratio.toPrecision(2)).toLocaleString("en-US");
  const power = String(Math.round(nats / Math.LN10));
  return `10${[...power].map((digit) => SUPERSCRIPT[Number(digit)]).join("")}`;
}

function meaning(score, model) {
  const test = model?.metrics?.test_loglik;
  const sentence =
    "log p(x) is the log-probability the model gives to these exact 784 black-and-white pixels; closer to 0 is more likely.";
  if (test == null) return `${sentence} This model was not evaluated on the test set, so there is no average to compare with.`;
  const diff = score.log_likelihood - test;
  const times = timesInWords(Math.abs(diff));
  const direction = diff >= 0 ? "more" : "less";
  return (
    `${sentence} On ${number(model.metrics.eval_size)} MNIST test digits this model averages ` +
    `${number(test, 1)} nats, so it finds your digit about ${times} times ${direction} probable than a typical test digit ` +
    `(${diff >= 0 ? "+" : "−"}${number(Math.abs(diff), 1)} nats).`
  );
}

async function padImage() {
  if (state.padSource) return [state.padSource, state.padSource.name];
  const blob = await new Promise((resolve) => pad().toBlob(resolve, "image/png"));
  return [blob, "drawing.png"];
}

async function score(event) {
  event.preventDefault();
  const button = $("#score");
  button.disabled = true;
  showMessage("#try-message", "Scoring…");
  try {
    const [image, filename] = await padImage();
    const upload = () => {
      const form = new FormData();
      form.append("file", image, filename);
      return form;
    };
    const query = {};
    if ($("#try-model").value) query.model_id = $("#try-model").value;
    const k = $("#try-k").value.trim();
    const [seen, result] = await Promise.all([
      api(`/reconstruct?${new URLSearchParams({ ...query, format: "json" })}`, { method: "POST", form: upload() }),
      api(`/loglik?${new URLSearchParams(k ? { ...query, k } : query)}`, { method: "POST", form: upload() }),
    ]).then((responses) => Promise.all(responses.map((r) => r.json())));
    drawDigit($("#seen"), seen.input);
    drawDigit($("#recon"), seen.reconstruction);
    $("#score-value").textContent = number(result.log_likelihood, 2);
    $("#score-error").textContent = number(result.std_error, 2);
    const diagnostics =
      result.pareto_k == null ? "" : `; ESS ${number(result.ess, 1)}; Pareto k̂ ${number(result.pareto_k, 2)}`;
    $("#score-detail").textContent =
      `(K=${number(result.k)} importance samples; ELBO ${number(result.elbo, 2)} nats; ${number(result.bits_per_dim, 3)} bits per pixel${diagnostics})`;
    const model = state.models.find((m) => m.model_id === result.model_id);
    // Above 0.7 the weights' variance is not finite in practice (Vehtari et al., PSIS): say so.
    const heavy = result.pareto_k > 0.7
      ? " Its Pareto k̂ is above 0.7: the importance weights are heavy-tailed, so the ± above can understate the real error."
      : "";
    $("#score-meaning").textContent = meaning(result, model) + heavy;
    $("#try-result").hidden = false;
    showMessage("#try-message", `Scored with model ${result.model_id.slice(0, 8)}.`);
  } catch (error) {
    showMessage("#try-message", `Not scored. ${error.message}`, { error: true });
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- start

async function start() {
  showView();
  window.addEventListener("hashchange", () => showView({ focus: true }));
  setUpPad();
  $("#train-form").addEventListener("submit", submitTraining);
  $("#train-form").addEventListener("reset", () => {
    markFields($("#train-form"), {});
    showMessage("#train-message", "");
  });
  $("#try-form").addEventListener("submit", score);
  $("#study-form").addEventListener("submit", submitStudy);
  $("#compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    showComparison(randomSeed());
  });
  try {
    await buildTrainForm();
  } catch (error) {
    showMessage("#train-message", `The form could not be built: ${error.message}`, { error: true });
  }
  await Promise.all([refreshJobs(), refreshStudies(), loadModels()]);
  setInterval(() => {
    if (document.visibilityState !== "visible") return;
    refreshJobs();
    refreshStudies();
    loadModels();
  }, LIST_REFRESH_MS);
  document.body.dataset.ready = "true"; // the page has loaded its data once
}

start();
