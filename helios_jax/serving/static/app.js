// The Helios live page: one WebSocket to /ws (protocol: docs/streaming.md), frames played from a buffer on a
// <canvas> at the video's frame rate. Plain script, no build step, nothing loaded from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const LOOKAHEAD = 48;   // frames decoded ahead of the one playing (JPEG blobs are kept, bitmaps only this far)
  const RESUME_AT = 8;    // after buffering, playback resumes once this many frames are ready (or the stream ended)

  // ---------------------------------------------------------------------------------------------------------------
  // State

  const page = {
    ws: null, info: null, busy: false, starting: false, reconnectMs: 500, promptEdited: false, upload: null, requests: 0,
  };
  let stream = null;   // the current stream (see newStream)

  function newStream(started) {
    return {
      id: started.stream_id, fps: started.fps || 24, perChunk: started.frames_per_chunk,
      total: started.num_chunks ? Math.min(started.num_chunks * started.frames_per_chunk,
                                           started.num_frames || Infinity) : null,
      frames: new Map(),          // index -> {blob, bitmap, decoding}
      prompts: new Map(),         // first frame of a chunk -> its prompt (shown when playback reaches it)
      chunk: null, chunkFrame: 0,   // the chunk whose binary frames are arriving, and how many have come
      received: 0, chunks: 0, next: 0, drawn: 0, nextDue: 0, buffering: true, generating: true, done: null,
      clickedAt: page.startClickedAt, firstDrawAt: null, serverTtff: null,
    };
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Connection

  function connect() {
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    ws.binaryType = "blob";
    page.ws = ws;
    ws.onopen = () => { page.reconnectMs = 500; setConn(true); };
    ws.onmessage = (m) => (typeof m.data === "string" ? onEvent(JSON.parse(m.data)) : onFrame(m.data));
    ws.onclose = () => {
      setConn(false);
      page.starting = false;
      if (stream && stream.generating) { stream.generating = false; setState("connection lost"); }
      setControls();
      setTimeout(connect, page.reconnectMs);
      page.reconnectMs = Math.min(page.reconnectMs * 2, 8000);
    };
  }

  function send(msg) {
    if (!page.ws || page.ws.readyState !== WebSocket.OPEN) { showError("not connected to the server"); return false; }
    page.ws.send(JSON.stringify(msg));
    return true;
  }

  function setConn(on) {
    $("conn-status").textContent = on ? "connected" : "offline";
    $("conn-status").classList.toggle("on", on);
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Events

  const handlers = {
    ready(ev) {
      page.info = ev; page.busy = ev.busy;
      const d = ev.defaults;
      $("model-info").textContent = `${ev.model} (Helios-${ev.kind}) \u00b7 ${ev.width}\u00d7${ev.height} at ` +
        `${ev.fps} fps \u00b7 ${ev.frames_per_chunk} frames per chunk`;
      $("sampler-info").textContent = `steps ${d.steps.join(" ")}, guidance ${d.guidance}, ${d.dtype}` +
        (ev.limits.max_frames ? ` \u00b7 at most ${ev.limits.max_frames} frames per stream` : "");
      $("endless-limit").textContent = ev.limits.max_frames ? `, at most ${ev.limits.max_frames} frames` : "";
      if (!$("num-frames").value) $("num-frames").value = d.num_frames;
      if (!$("seed").value) $("seed").value = d.seed;
      $("blend").value = d.blend_chunks;
      const canvas = $("screen");
      if (!stream) { canvas.width = ev.width; canvas.height = ev.height; clearScreen(); }
      onModeChange();
      setControls();
    },
    device(ev) { page.busy = ev.busy; setControls(); },
    started(ev) {
      page.starting = false;
      if (stream) for (const f of stream.frames.values()) if (f.bitmap) f.bitmap.close();
      stream = newStream(ev);
      const canvas = $("screen");
      canvas.width = ev.width; canvas.height = ev.height;
      $("result").classList.add("hidden");
      setState(`generating (${ev.mode}, seed ${ev.seed})`);
      setOverlay("waiting for the first chunk\u2026");
      $("prompt-now").textContent = ev.prompt;
      log(`started ${ev.stream_id}: ${ev.endless ? "endless" : (ev.num_frames + " frames")}`);
      setControls();
    },
    chunk(ev) {
      if (!stream) return;
      stream.chunk = ev; stream.chunkFrame = 0; stream.chunks += 1;
      if (ev.index === 0) stream.serverTtff = ev.elapsed_s;
      const g = ev.generation_fps, c = ev.chunk_fps;
      $("gen-fps").textContent = `${fmt(g, 1)} fps overall` + (c ? ` \u00b7 last chunk ${fmt(c, 1)} fps` : "") +
        (g ? ` (${fmt(g / stream.fps, 2)}\u00d7 real time)` : "");
      $("chunks").textContent = stream.chunks + (stream.total ? ` / ${Math.ceil(stream.total / stream.perChunk)}` : "");
      stream.prompts.set(ev.first_frame, ev.prompt);
      log(`chunk ${ev.index}: frames ${ev.first_frame}\u2013${ev.first_frame + ev.num_frames - 1}, ` +
          `${fmt(ev.timings.interval_s, 2)} s`);
    },
    prompt_accepted(ev) {
      const when = ev.expected_chunk === null ? "the stream may end before it" : `expected from chunk ${ev.expected_chunk}`;
      setRequest(ev.id, `accepted as #${ev.request_id}, ${when}`, "", ev.request_id);
    },
    prompt_applied(ev) {
      const li = document.querySelector(`#prompt-log li[data-rid="${ev.request_id}"]`);
      if (li) { li.querySelector(".status").textContent = `applied at chunk ${ev.chunk} (frame ${ev.first_frame})`; li.className = "applied"; }
      log(`prompt #${ev.request_id} applied at chunk ${ev.chunk}`);
    },
    stopping() { setState("stopping (finishing the chunks in flight)\u2026"); },
    done(ev) {
      if (!stream) return;
      stream.generating = false; stream.done = ev; stream.total = ev.frames;
      setState(`done: ${ev.reason}, ${ev.frames} frames`);
      $("gen-fps").textContent = `${fmt(ev.generation_fps, 1)} fps overall` +
        (ev.steady_fps ? ` \u00b7 ${fmt(ev.steady_fps, 1)} fps after the first chunk` : "");
      if (ev.video_url) {
        $("download").href = ev.video_url;
        $("download").setAttribute("download", `helios-${ev.stream_id}.mp4`);
        $("result-info").textContent = `${ev.frames} frames, ${fmt(ev.frames / stream.fps, 1)} s`;
        $("result").classList.remove("hidden");
      }
      for (const rid of ev.unapplied_request_ids || []) {
        const li = document.querySelector(`#prompt-log li[data-rid="${rid}"]`);
        if (li) { li.querySelector(".status").textContent = "not applied: the stream ended first"; li.className = "failed"; }
      }
      log(`done: ${ev.reason}, ${ev.frames} frames, first frame after ${fmt(ev.time_to_first_frame_s, 1)} s`);
      setControls();
    },
    error(ev) {
      showError(`${ev.message} (${ev.code})`);
      if (ev.id === "start") page.starting = false;
      if (ev.id && String(ev.id).startsWith("p")) setRequest(ev.id, `refused: ${ev.message}`, "failed");
      if (ev.fatal && stream) { stream.generating = false; setState(`failed (${ev.code})`); }
      log(`error ${ev.code}: ${ev.message}`);
      setControls();
    },
  };

  function onEvent(ev) {
    const h = handlers[ev.type];
    if (h) h(ev); else log(`(unknown event ${ev.type})`);
  }

  function onFrame(blob) {
    if (!stream || !stream.chunk) return;
    const index = stream.chunk.first_frame + stream.chunkFrame++;
    stream.frames.set(index, { blob, bitmap: null, decoding: false });
    stream.received += 1;
    decodeAhead();
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Playback: one frame per 1/fps from the buffer; waits ("buffering") when the next frame is not there yet

  function decodeAhead() {
    if (!stream) return;
    const s = stream;
    for (let i = s.next; i < s.next + LOOKAHEAD; i++) {
      const f = s.frames.get(i);
      if (!f) break;
      if (f.bitmap || f.decoding) continue;
      f.decoding = true;
      createImageBitmap(f.blob).then((bmp) => {
        if (s.frames.get(i) === f) f.bitmap = bmp; else bmp.close();
      }, () => { f.decoding = false; });
    }
  }

  function readyAhead(s) {
    let n = 0;
    while (n < LOOKAHEAD && s.frames.get(s.next + n) && s.frames.get(s.next + n).bitmap) n++;
    return n;
  }

  function tick(now) {
    requestAnimationFrame(tick);
    const s = stream;
    if (!s) return;
    const period = 1000 / s.fps;
    const remaining = s.total === null ? Infinity : s.total - s.next;
    if (remaining <= 0) {
      if (!s.generating) setOverlay(s.done ? `finished \u00b7 ${s.drawn} frames` : null);
      return;
    }
    if (s.buffering) {
      const ready = readyAhead(s);
      if (ready < Math.min(RESUME_AT, remaining) && (s.generating || !ready)) {
        if (s.received > 0 || !s.generating) setOverlay(s.generating ? "buffering\u2026" : null);
        decodeAhead();
        return;
      }
      s.buffering = false; s.nextDue = now; setOverlay(null);
    }
    if (now < s.nextDue) return;
    const f = s.frames.get(s.next);
    if (!f || !f.bitmap) {   // ran dry: the generator is slower than real time
      s.buffering = true;
      if (s.generating) setOverlay("buffering\u2026");
      return;
    }
    $("screen").getContext("2d").drawImage(f.bitmap, 0, 0, $("screen").width, $("screen").height);
    f.bitmap.close();
    s.frames.delete(s.next);
    const p = s.prompts.get(s.next);
    if (p) {   // playback enters a chunk: show the prompt it was made with
      $("prompt-now").textContent = `${p.text ?? "(embeddings)"}` + (p.weight < 1 ? ` (blend ${fmt(p.weight * 100, 0)}%)` : "");
      s.prompts.delete(s.next);
    }
    s.next += 1; s.drawn += 1;
    if (s.firstDrawAt === null) {
      s.firstDrawAt = now;
      $("ttff").textContent = s.clickedAt ? `${fmt((performance.now() - s.clickedAt) / 1000, 1)} s` +
        (s.serverTtff !== null ? ` (server ${fmt(s.serverTtff, 1)} s)` : "") : `server ${fmt(s.serverTtff, 1)} s`;
    }
    s.nextDue += period;
    if (now - s.nextDue > period) s.nextDue = now + period;   // late (a slow tab): do not catch up in a burst
    decodeAhead();
    updateCounters();
  }

  function updateCounters() {
    const s = stream;
    if (!s) return;
    $("frame-counter").textContent = s.drawn + (s.total ? ` / ${s.total}` : "");
    $("buffered").textContent = `${s.received - s.drawn} frames (${fmt((s.received - s.drawn) / s.fps, 1)} s)`;
    const total = s.total || Math.max(s.received, 1);
    $("progress-gen").style.width = `${Math.min(100, 100 * s.received / total)}%`;
    $("progress-play").style.width = `${Math.min(100, 100 * s.drawn / total)}%`;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Controls

  function mode() { return document.querySelector("input[name=mode]:checked").value; }

  function onModeChange() {
    const m = mode(), info = page.info;
    const needs = m === "i2v" ? "image" : m === "v2v" ? "video" : null;
    $("upload-row").classList.toggle("hidden", !needs);
    if (needs) {
      $("upload-label").textContent = needs === "image" ? "Start image" : "Start video";
      $("upload").accept = needs + "/*";
      const bundled = info && info.defaults[needs === "image" ? "start_image_url" : "start_video_url"];
      $("upload-hint").textContent = page.upload && page.upload.kind === needs ? "" :
        (bundled ? `none chosen: the bundled start ${needs} is used` : `choose a start ${needs}`);
      showPreview(page.upload && page.upload.kind === needs ? page.upload.url : bundled, needs);
    }
    const bundledPrompt = info && info.defaults.prompts[m];
    if (bundledPrompt && !page.promptEdited) $("prompt").value = bundledPrompt;
    setControls();
  }

  function showPreview(url, kind) {
    const box = $("upload-preview");
    box.textContent = "";
    if (!url) return;
    const el = document.createElement(kind === "image" ? "img" : "video");
    el.src = url;
    if (kind === "video") { el.muted = true; el.loop = true; el.autoplay = true; el.playsInline = true; }
    box.appendChild(el);
  }

  function onUpload() {
    const file = $("upload").files[0];
    if (!file) { page.upload = null; onModeChange(); return; }
    const kind = mode() === "i2v" ? "image" : "video";
    const limit = page.info ? page.info.limits.max_upload_bytes : Infinity;
    if (file.size > limit) {
      showError(`${file.name} is ${fmt(file.size / 2 ** 20, 1)} MiB; this server takes uploads up to ` +
                `${fmt(limit / 2 ** 20, 1)} MiB`);
      $("upload").value = ""; page.upload = null; onModeChange();
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      page.upload = { kind, dataUrl: reader.result, url: URL.createObjectURL(file), name: file.name };
      onModeChange();
    };
    reader.onerror = () => showError(`cannot read ${file.name}`);
    reader.readAsDataURL(file);
  }

  function onStart() {
    hideError();
    const m = mode();
    const msg = { type: "start", mode: m, prompt: $("prompt").value.trim(), id: "start" };
    if (!msg.prompt) { showError("write a prompt first"); return; }
    const neg = $("negative").value.trim();
    if (neg) msg.negative_prompt = neg;
    if ($("endless").checked) msg.endless = true;
    else if ($("num-frames").value) msg.num_frames = Number($("num-frames").value);
    if ($("seed").value !== "") msg.seed = Number($("seed").value);
    msg.blend_chunks = Number($("blend").value);
    const kind = m === "i2v" ? "image" : m === "v2v" ? "video" : null;
    if (kind && page.upload && page.upload.kind === kind) msg[kind] = page.upload.dataUrl;
    page.startClickedAt = performance.now();
    if (send(msg)) { page.starting = true; setState("starting\u2026"); setControls(); }
  }

  function onChangePrompt() {
    const text = $("live-prompt").value.trim();
    if (!text) return;
    const id = `p${++page.requests}`;
    const li = document.createElement("li");
    li.dataset.id = id;
    li.innerHTML = `<span class="text"></span> \u2014 <span class="status">sent</span>`;
    li.querySelector(".text").textContent = `\u201c${text}\u201d`;
    $("prompt-log").prepend(li);
    if (!send({ type: "prompt", prompt: text, blend_chunks: Number($("blend").value), id })) return;
    $("live-prompt").value = "";
  }

  function setRequest(id, status, cls, rid) {
    const li = document.querySelector(`#prompt-log li[data-id="${id}"]`);
    if (!li) return;
    li.querySelector(".status").textContent = status;
    li.className = cls || "";
    if (rid !== undefined) li.dataset.rid = rid;
  }

  function setControls() {
    const connected = page.ws && page.ws.readyState === WebSocket.OPEN && page.info;
    const running = !!(stream && stream.generating);
    $("start").disabled = !connected || running || page.starting || page.busy;
    $("stop").disabled = !connected || !running;
    for (const id of ["live-prompt", "blend", "change"]) $(id).disabled = !connected || !running;
    $("busy-note").classList.toggle("hidden", !(page.busy && !running && !page.starting));
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Small helpers

  function fmt(x, digits) { return x === null || x === undefined || !isFinite(x) ? "\u2013" : Number(x).toFixed(digits); }
  function setState(text) { $("state").textContent = text; }
  function setOverlay(text) {
    const o = $("overlay");
    o.classList.toggle("hidden", !text);
    if (text) o.textContent = text;
  }
  function clearScreen() {
    const c = $("screen"), g = c.getContext("2d");
    g.fillStyle = "#000"; g.fillRect(0, 0, c.width, c.height);
  }
  function showError(text) { const e = $("error"); e.textContent = text; e.classList.remove("hidden"); }
  function hideError() { $("error").classList.add("hidden"); }
  function log(text) {
    const li = document.createElement("li");
    li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
    const ol = $("log");
    ol.prepend(li);
    while (ol.children.length > 200) ol.lastChild.remove();
  }

  // For tests and the curious: what the player has done so far.
  window.heliosPage = {
    stats() {
      const s = stream;
      return {
        state: $("state").textContent, connected: !!(page.ws && page.ws.readyState === WebSocket.OPEN),
        streaming: !!(s && s.generating), received: s ? s.received : 0, drawn: s ? s.drawn : 0,
        chunks: s ? s.chunks : 0, buffering: s ? s.buffering : false, done: s ? s.done : null,
        prompts: [...document.querySelectorAll("#prompt-log li")].map((li) => li.textContent),
      };
    },
  };

  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", onModeChange);
  $("prompt").addEventListener("input", () => { page.promptEdited = true; });
  $("upload").addEventListener("change", onUpload);
  $("start").addEventListener("click", onStart);
  $("stop").addEventListener("click", () => { if (send({ type: "stop", id: "stop" })) $("stop").disabled = true; });
  $("change").addEventListener("click", onChangePrompt);
  $("live-prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") onChangePrompt(); });
  clearScreen();
  connect();
  requestAnimationFrame(tick);
})();
