/* tledge-runtime serve: the page's one script. It talks to this server only (the CSP allows nothing else)
   and calls three endpoints: GET /info, POST /predict, GET /metrics. Everything the server sends goes into the
   page as text (textContent), never as markup: labels and names come from a model file, file names from the
   visitor's disk. The token lives in this tab's sessionStorage and travels in the Authorization header only. */
"use strict";

(() => {
  const API = { info: "/info", predict: "/predict", metrics: "/metrics" };
  const TOKEN_KEY = "tledge-token";
  const MAX_TOKEN_CHARS = 1024;
  const REFRESH_MS = 3000; // live figures, while the page is visible
  const MIN_WINDOW_S = 1; // a refresh right after an answer does not make a rate of a few hundred milliseconds
  const INFERENCE = new Set(["predict", "infer"]); // endpoint labels of the server's metrics that run the model
  // Counters of "unknown" answers (models with an out-of-distribution score): any tledge_*unknown*_total counter,
  // summed over its labels; or a ready-made ratio gauge. Servers and models without them show "not reported".
  const UNKNOWN_COUNTER = /^tledge_\w*unknown\w*_total$/;
  const UNKNOWN_RATIO = /^tledge_\w*unknown\w*_(rate|ratio)$/;
  const MAX_METRICS_CHARS = 4 << 20; // a hostile or broken /metrics cannot make the page parse forever
  const MAX_LABELS_SHOWN = 20;
  const $ = (id) => document.getElementById(id);

  const state = { token: loadToken(), info: null, last: null, timer: 0, refused: false, preview: "", stream: null };

  class ApiError extends Error {
    constructor(status, message, hint) {
      super(message);
      this.status = status;
      this.hint = hint || "";
    }
  }

  // ------------------------------------------------------------------ small helpers

  const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const str = (v, max = 300) => (v === undefined || v === null ? "–" : String(v).slice(0, max));
  const pct = (v, digits) => (isNum(v) ? `${(v * 100).toFixed(digits)}%` : "–");
  const signed = (v, digits) => (isNum(v) ? `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(digits)}` : "–");

  function bytes(n) {
    if (!isNum(n)) return "–";
    if (n < 1024) return `${n} bytes`;
    return n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
  }

  function node(tag, cls, text) {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function say(id, text, cls) {
    const el = $(id);
    el.textContent = text;
    if (cls !== undefined) el.className = cls;
  }

  function fail(message, hint) {
    say("error", hint ? `${message} (${hint})` : message);
  }

  // ------------------------------------------------------------------ the token and the one way to call the server

  function loadToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return ""; // storage disabled: the token lives in memory for this page only
    }
  }

  function saveToken(token) {
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* storage disabled: memory only */
    }
  }

  async function api(path, options, timeoutMs) {
    const headers = new Headers(options.headers || {});
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), timeoutMs);
    let resp;
    try {
      resp = await fetch(path, { ...options, headers, signal: abort.signal, cache: "no-store", credentials: "omit",
                                 redirect: "error", referrerPolicy: "no-referrer" });
    } catch (e) {
      throw abort.signal.aborted
        ? new ApiError(0, `the server did not answer within ${timeoutMs / 1000} s`, "it may be overloaded; retry")
        : new ApiError(0, "the server cannot be reached", "check that serve still runs and this device can reach it");
    } finally {
      clearTimeout(timer);
    }
    if (resp.status === 401) {
      refused();
      throw new ApiError(401, state.token ? "the token was refused" : "this server needs a token",
                         "enter the token serve was started with, above");
    }
    if (!resp.ok) {
      let body = null;
      try {
        body = await resp.json(); // serve answers every error as {"error": ..., "hint": ...}
      } catch (e) {
        body = null;
      }
      const message = isObj(body) && typeof body.error === "string" ? body.error : `HTTP ${resp.status}`;
      throw new ApiError(resp.status, message, isObj(body) && typeof body.hint === "string" ? body.hint : "");
    }
    return resp;
  }

  function refused() {
    clearTimeout(state.timer);
    const had = Boolean(state.token);
    state.refused = true;
    saveToken("");
    const auth = $("auth");
    const wasHidden = auth.hidden;
    auth.hidden = false;
    say("auth-msg", had ? "The token was refused. Check it (it is case-sensitive) and enter it again."
                        : "This server needs a token. Enter the one serve was started with.");
    say("conn", "Not connected: a token is needed.", "error");
    if (wasHidden) $("token").focus();
  }

  function useToken(event) {
    event.preventDefault(); // handled here: the form is never submitted (the CSP's form-action 'none' agrees)
    const token = $("token").value.trim();
    if (!token || token.length > MAX_TOKEN_CHARS || !/^[\x21-\x7e]+$/.test(token)) {
      say("auth-msg", `A token is 1 to ${MAX_TOKEN_CHARS} printable characters without spaces.`);
      return;
    }
    state.token = token;
    saveToken(token);
    state.refused = false;
    say("auth-msg", "");
    loadInfo();
  }

  function forgetToken() {
    state.token = "";
    saveToken("");
    $("token").value = "";
    state.refused = false;
    loadInfo();
  }

  // ------------------------------------------------------------------ the model card (GET /info)

  async function loadInfo() {
    try {
      const info = await (await api(API.info, {}, 15000)).json();
      state.info = isObj(info) ? info : {};
      renderCard(state.info);
      say("conn", `Connected to ${location.host}${state.token ? " with a token" : ""}.`, "ok");
      if (state.token) $("auth").hidden = false; // so that the token can be changed or forgotten
      say("auth-msg", "");
      state.last = null;
      scheduleMetrics(0);
    } catch (e) {
      if (e.status === 401) return; // refused() asked for the token; a new one loads the card again
      say("conn", `${e.message} (${e.hint}); trying again every ${REFRESH_MS / 1000} s`, "error");
      clearTimeout(state.timer);
      state.timer = setTimeout(loadInfo, REFRESH_MS); // a device that restarts comes back by itself
    }
  }

  function renderCard(info) {
    const dl = $("card-list");
    dl.replaceChildren();
    const row = (term, value, cls) => dl.append(node("dt", "", term), node("dd", cls || "", value));
    const meta = isObj(info.meta) ? info.meta : {};
    const prov = isObj(meta.provenance) ? meta.provenance : {};
    const pre = isObj(meta.preprocess) ? meta.preprocess : {};
    const labels = Array.isArray(info.labels) ? info.labels.map((l) => str(l)) : [];
    const names = Array.isArray(info.names) ? info.names.map((n) => str(n, 100)).join(", ") : "";
    row("File", str(info.model));
    if (names) row("Served as", names);
    if ("version" in info) row("Version", str(info.version, 100));
    row("Architecture", str(prov.architecture));
    row("Precision", str(meta.precision) + quantization(meta.quantization));
    row("Backend", str(info.backend));
    row("Labels", `${labels.length}: ${labels.slice(0, MAX_LABELS_SHOWN).join(", ")}`
                  + (labels.length > MAX_LABELS_SHOWN ? `, and ${labels.length - MAX_LABELS_SHOWN} more` : ""));
    row("Input", `${str(pre.width)}×${str(pre.height)} px, ${str(pre.resize)} resize`);
    row("Export verification", ...verification(meta.verification));
    row("Reference check", ...referenceCheck(info, meta));
    if ("signature" in info) row("Signature", ...signature(info.signature));
    const limits = isObj(info.limits) ? info.limits : {};
    row("Images up to", bytes(limits.max_bytes));
    const title = str(info.model, 100);
    say("title-model", `· ${title}`);
    document.title = `${title} · tledge-runtime`;
  }

  function quantization(q) {
    if (!isObj(q)) return "";
    return ` (${str(q.target, 40)} flavour, ${str(q.method, 40)} calibration on ${str(q.calibration_images, 20)} images)`;
  }

  function verification(v) {
    if (!isObj(v)) return ["not recorded in the model file", ""];
    const against = str(v.reference || "PyTorch", 120);
    const text = `${pct(v.agreement, 1)} top-1 agreement with ${against} on ${str(v.images, 20)} images, `
                 + `accuracy ${signed(v.accuracy_delta_points, 2)} points`;
    return v.passed === true ? [`passed: ${text}`, "ok"] : [`FAILED: ${text}`, "bad"];
  }

  function referenceCheck(info, meta) {
    const rc = info.reference_check;
    const refs = isObj(meta.reference_set) && Array.isArray(meta.reference_set.items) ? meta.reference_set.items.length : 0;
    if (isObj(rc) && rc.ok === true) {
      const n = isNum(rc.references) ? rc.references : 0;
      return [`passed when serve started, on ${str(info.backend)} (${n} reference${n === 1 ? "" : "s"})`, "ok"];
    }
    if (isObj(rc)) return ["FAILED when serve started: see the server's log", "bad"];
    if (refs) return [`not run by this server: ${refs} references carried (start serve with --check)`, ""];
    return ["the model carries no reference set", ""];
  }

  function signature(sig) {
    if (sig === null || sig === undefined) return ["none", ""];
    if (typeof sig === "boolean") return [sig ? "verified" : "not verified", sig ? "ok" : "bad"];
    if (!isObj(sig)) return [str(sig), ""];
    const by = ["signer", "identity", "key", "by"].map((k) => sig[k]).find((v) => typeof v === "string");
    const who = by ? ` (${str(by, 120)})` : "";
    if (typeof sig.verified === "boolean") return [(sig.verified ? "verified" : "NOT verified") + who, sig.verified ? "ok" : "bad"];
    if (typeof sig.status === "string") return [str(sig.status, 120) + who, ""];
    return [JSON.stringify(sig).slice(0, 200), ""];
  }

  // ------------------------------------------------------------------ the answer (POST /predict)

  async function predict(blob, name) {
    say("error", "");
    clearAnswer();
    const limits = state.info && isObj(state.info.limits) ? state.info.limits : {};
    if (blob.size === 0) return fail(`${name} is empty`, "choose an image file");
    if (blob.type && !blob.type.startsWith("image/")) {
      return fail(`${name} is not an image (${blob.type})`, "choose a JPEG, PNG, BMP, TIFF or WebP file");
    }
    if (isNum(limits.max_bytes) && blob.size > limits.max_bytes) {
      return fail(`${name} is ${bytes(blob.size)}, more than the ${bytes(limits.max_bytes)} the server takes`,
                  "downscale or recompress it, or start serve with a larger --max-bytes");
    }
    showPreview(blob, name);
    say("status", `Asking the model about ${name}…`);
    const timeoutMs = (isNum(limits.timeout_s) ? limits.timeout_s : 30) * 1000 + 5000;
    try {
      const resp = await api(API.predict, { method: "POST", body: blob,
                                            headers: { "Content-Type": blob.type || "application/octet-stream" } },
                             timeoutMs);
      renderAnswer(await resp.json(), name);
      scheduleMetrics(300); // the figures count this answer at once
    } catch (e) {
      say("status", `No answer for ${name}.`);
      fail(e.status === 401 ? `${e.message[0].toUpperCase()}${e.message.slice(1)}` : e.message, e.hint);
    }
  }

  function clearAnswer() {
    for (const id of ["label", "score"]) say(id, "");
    for (const id of ["unknown", "set"]) $(id).hidden = true;
    $("topk").replaceChildren();
  }

  function showPreview(blob, name) {
    const img = $("preview");
    if (state.preview) URL.revokeObjectURL(state.preview);
    state.preview = URL.createObjectURL(blob);
    img.src = state.preview;
    img.alt = `The image sent: ${name}`;
    img.hidden = false;
  }

  function renderAnswer(a, name) {
    a = isObj(a) ? a : {};
    const set = Array.isArray(a.candidates) ? a.candidates.map((c) => str(c)) : null;
    say("label", str(a.label));
    say("score", pct(a.score, 2));
    say("status", name + (isNum(a.latency_ms) ? ` · answered in ${a.latency_ms.toFixed(1)} ms on the server` : ""));
    renderUnknown(a);
    if (set) {
      const el = $("set");
      el.hidden = false;
      el.textContent = set.length === 0 ? "Prediction set: empty (no class is plausible)"
        : set.length === 1 ? `Prediction set: ${set[0]} (one class at the model's coverage)`
        : `Prediction set: ${set.join(", ")}: unsure, route to a person`;
      el.className = set.length === 1 ? "" : "warn";
    }
    const list = $("topk");
    for (const p of (Array.isArray(a.topk) ? a.topk : []).slice(0, 100)) {
      if (!isObj(p)) continue;
      const label = str(p.label);
      const li = node("li", set && set.includes(label) ? "in-set" : "");
      const track = node("span", "track");
      const fill = node("span", "fill");
      fill.style.width = `${isNum(p.score) ? Math.min(1, Math.max(0, p.score)) * 100 : 0}%`; // CSSOM: CSP allows it
      track.setAttribute("aria-hidden", "true");
      track.append(fill);
      const nameEl = node("span", "name", label);
      nameEl.title = label;
      li.append(nameEl, track, node("span", "value", pct(p.score, 1)));
      list.append(li);
    }
  }

  function renderUnknown(a) {
    const el = $("unknown");
    const ood = isNum(a.ood_score) ? `out-of-distribution score ${a.ood_score.toFixed(3)}` : "";
    if (a.unknown === true) {
      el.textContent = `Unknown: this image looks unlike the training data${ood ? ` (${ood})` : ""}. `
                       + `Nearest class: ${str(a.label)}.`;
      el.className = "warn";
    } else if (ood) {
      el.textContent = `Known: ${ood} (higher is further from the training data).`;
      el.className = "";
    } else {
      return;
    }
    el.hidden = false;
  }

  // ------------------------------------------------------------------ live figures (GET /metrics)

  function scheduleMetrics(delayMs) {
    clearTimeout(state.timer);
    if (!state.refused && state.info) state.timer = setTimeout(refreshMetrics, delayMs);
  }

  async function refreshMetrics() {
    if (document.hidden) return; // resumed by visibilitychange: a tab in the background costs the device nothing
    try {
      const text = await (await api(API.metrics, {}, 10000)).text();
      showFigures(summarize(parseMetrics(text.slice(0, MAX_METRICS_CHARS))));
      say("conn", `Connected to ${location.host}${state.token ? " with a token" : ""}.`, "ok");
    } catch (e) {
      if (e.status === 401) return;
      say("conn", `${e.message} (${e.hint})`, "error");
    }
    scheduleMetrics(REFRESH_MS);
  }

  // Prometheus text format: `name{label="value",...} value [timestamp]`; comments start with '#'.
  function parseMetrics(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!line.startsWith("tledge_")) continue;
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (m) samples.push({ name: m[1], labels: parseLabels(m[2] || ""), value: promNumber(m[3]) });
    }
    return samples;
  }

  function parseLabels(text) {
    const labels = {};
    const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    let m;
    while ((m = re.exec(text)) !== null) labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    return labels;
  }

  function promNumber(text) {
    if (text === "+Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    return Number(text);
  }

  function summarize(samples) {
    const s = { t: performance.now(), requests: 0, answered: 0, buckets: new Map(), unknown: null, ratio: null,
                inFlight: null };
    for (const { name, labels, value } of samples) {
      if (!isNum(value)) continue;
      if (name === "tledge_requests_total" && INFERENCE.has(labels.endpoint)) {
        s.requests += value;
        if (labels.status === "200") s.answered += value;
      } else if (name === "tledge_request_seconds_bucket" && INFERENCE.has(labels.endpoint)) {
        const le = promNumber(labels.le);
        if (!Number.isNaN(le)) s.buckets.set(le, (s.buckets.get(le) || 0) + value);
      } else if (name === "tledge_in_flight") {
        s.inFlight = value;
      } else if (UNKNOWN_COUNTER.test(name)) {
        s.unknown = (s.unknown || 0) + value;
      } else if (UNKNOWN_RATIO.test(name)) {
        s.ratio = value;
      }
    }
    s.buckets = [...s.buckets.entries()].sort((x, y) => x[0] - y[0]); // [upper bound s, cumulative count]
    return s;
  }

  function showFigures(now) {
    let prev = state.last;
    if (prev && now.requests < prev.requests) prev = null; // the server restarted: its counters began again
    const dt = prev ? (now.t - prev.t) / 1000 : 0;
    if (!prev || dt >= MIN_WINDOW_S) state.last = now; // else the next window starts from the older sample
    say("rps", prev && dt > 0 ? ((now.requests - prev.requests) / dt).toFixed(1) : "measuring…");
    let buckets = now.buckets;
    let scope = "from the server's first request";
    if (prev) {
      const before = new Map(prev.buckets);
      const recent = now.buckets.map(([le, n]) => [le, n - (before.get(le) || 0)]);
      if (recent.length && recent[recent.length - 1][1] > 0) {
        buckets = recent;
        scope = `over the last ${dt.toFixed(1)} s`;
      }
    }
    say("p50", latency(quantile(0.5, buckets)));
    say("p99", latency(quantile(0.99, buckets)));
    say("live-scope", scope);
    say("unknown-rate", unknownRate(now, prev));
    say("answered", String(now.answered));
    say("in-flight", now.inFlight === null ? "–" : String(now.inFlight));
  }

  // The q-quantile of a cumulative histogram, linear within its bucket (as Prometheus' histogram_quantile).
  function quantile(q, buckets) {
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (!(total > 0)) return null;
    const rank = q * total;
    let lower = 0;
    let below = 0;
    for (const [le, n] of buckets) {
      if (n >= rank) {
        if (le === Infinity) return { seconds: lower, over: true };
        return { seconds: lower + ((le - lower) * (rank - below)) / Math.max(n - below, 1e-12), over: false };
      }
      lower = le;
      below = n;
    }
    return { seconds: lower, over: true };
  }

  function latency(x) {
    if (!x) return "no requests yet";
    const ms = x.seconds * 1000;
    const text = `${ms < 10 ? ms.toFixed(2) : ms.toFixed(1)} ms`;
    return x.over ? `> ${text}` : text;
  }

  function unknownRate(now, prev) {
    if (now.ratio !== null) return pct(now.ratio, 1);
    if (now.unknown === null) return "not reported by this server";
    const answered = prev ? now.answered - prev.answered : now.answered;
    const unknown = prev && prev.unknown !== null ? now.unknown - prev.unknown : now.unknown;
    if (answered > 0) return pct(unknown / answered, 1);
    return now.answered > 0 ? pct(now.unknown / now.answered, 1) : "no answers yet";
  }

  // ------------------------------------------------------------------ image sources: file, drop, camera

  function setupPicker() {
    $("file").addEventListener("change", (e) => {
      const file = e.target.files && e.target.files[0];
      e.target.value = ""; // choosing the same file again is a new request
      if (file) predict(file, file.name);
    });
    const drop = $("drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (e) => {
        e.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) predict(file, file.name);
      else fail("nothing readable was dropped", "drop an image file");
    });
    // A file dropped beside the box would make the browser open it and leave the page.
    for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
  }

  function setupCamera() {
    const buttons = ["camera-start", "camera-snap", "camera-stop"].map($);
    const media = navigator.mediaDevices;
    if (!window.isSecureContext || !media || typeof media.getUserMedia !== "function") {
      for (const b of buttons) b.hidden = true;
      say("camera-note", `The camera works on HTTPS or on localhost only; this page came over plain HTTP from `
                         + `${location.host}. Start serve with --ssl-certfile and --ssl-keyfile to use it here, `
                         + "or take a photo and choose it above.");
      return;
    }
    say("camera-note", "Or take a snapshot with this device's camera (the browser asks first).");
    buttons[0].addEventListener("click", startCamera);
    buttons[1].addEventListener("click", snapshot);
    buttons[2].addEventListener("click", stopCamera);
    window.addEventListener("pagehide", stopCamera);
  }

  async function startCamera() {
    say("error", "");
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    } catch (e) {
      const [message, hint] = cameraError(e);
      return fail(message, hint);
    }
    const video = $("video");
    video.srcObject = state.stream;
    video.hidden = false;
    try {
      await video.play();
    } catch (e) {
      /* autoplay refused: the frame still arrives, snapshot waits for it */
    }
    $("camera-start").disabled = true;
    $("camera-snap").disabled = false;
    $("camera-stop").disabled = false;
    $("camera-snap").focus();
  }

  function cameraError(e) {
    switch (e && e.name) {
      case "NotAllowedError": return ["the camera permission was refused", "allow the camera for this page in the browser's site settings"];
      case "NotFoundError":
      case "OverconstrainedError": return ["no camera was found", "connect one, or choose a photo"];
      case "NotReadableError": return ["the camera is busy", "close the other app that uses it"];
      default: return [`the camera did not start (${str(e && e.message, 200)})`, "choose a photo instead"];
    }
  }

  function snapshot() {
    const video = $("video");
    if (!video.videoWidth) return fail("the camera has not delivered a picture yet", "wait a moment and try again");
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => (blob ? predict(blob, "camera snapshot")
                                  : fail("the snapshot could not be encoded", "try again")), "image/jpeg", 0.92);
  }

  function stopCamera() {
    if (state.stream) for (const track of state.stream.getTracks()) track.stop();
    state.stream = null;
    const video = $("video");
    video.srcObject = null;
    video.hidden = true;
    $("camera-start").disabled = false;
    $("camera-snap").disabled = true;
    $("camera-stop").disabled = true;
  }

  // ------------------------------------------------------------------ start

  $("token-form").addEventListener("submit", useToken);
  $("token-forget").addEventListener("click", forgetToken);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) scheduleMetrics(0);
  });
  setupPicker();
  setupCamera();
  loadInfo();
})();
