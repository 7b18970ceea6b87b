// Chat / completion page for the inference service. Plain ES2020, no build step.
'use strict';

const $ = (id) => document.getElementById(id);
const els = {
  model: $('model'), refresh: $('refresh'), mode: $('mode'), status: $('status'),
  messages: $('messages'), prompt: $('prompt'), send: $('send'), stop: $('stop'),
  clear: $('clear'), maxTokens: $('max_tokens'), temperature: $('temperature'),
};

const TRANSIENT = new Set(['loading', 'unloading']);
let models = [];            // last /models payload (data array)
let conversation = [];      // chat history: [{role, content}]
let controller = null;      // AbortController of the running request
let pollTimer = null;

// ---------- models ----------

function selectedModel() {
  return models.find((m) => m.id === els.model.value) || null;
}

function isChat(m) {
  return !!m && m.has_chat_template === true;
}

async function loadModels() {
  clearTimeout(pollTimer);
  const previous = els.model.value;
  els.refresh.disabled = true;
  try {
    const res = await fetch('/models', { headers: { Accept: 'application/json' } });
    if (!res.ok) throw new Error(await errorMessage(res));
    const body = await res.json();
    models = Array.isArray(body.data) ? body.data : [];
    els.model.replaceChildren(...models.map((m) => {
      const opt = document.createElement('option');
      opt.value = m.id;
      opt.textContent = `${m.id} (${m.status || 'unknown'})`;
      return opt;
    }));
    if (models.some((m) => m.id === previous)) els.model.value = previous;
    else {
      const firstLoaded = models.find((m) => m.status === 'loaded');
      if (firstLoaded) els.model.value = firstLoaded.id;
    }
    updateModelInfo();
    // Keep polling while some model is changing state.
    if (models.some((m) => TRANSIENT.has(m.status))) pollTimer = setTimeout(loadModels, 3000);
  } catch (err) {
    setStatus(`Could not load models: ${err.message}`, 'error');
  } finally {
    els.refresh.disabled = false;
  }
}

function updateModelInfo() {
  const m = selectedModel();
  const chat = isChat(m);
  els.mode.textContent = m ? (chat ? 'chat' : 'completion') : '–';
  document.body.classList.toggle('completion-mode', !!m && !chat);
  els.prompt.placeholder = chat || !m ? 'Type a message…' : 'Type a prompt to continue…';
  if (!models.length) { setStatus('No models available.', 'warn'); return; }
  if (!m) { setStatus(`${models.length} model(s); none selected.`, 'warn'); return; }
  const parts = [`${models.length} model(s)`, `${m.id}: ${m.status}`];
  if (m.context_length) parts.push(`context ${m.context_length}`);
  parts.push(chat ? 'chat template: yes' : (m.has_chat_template === false ? 'no chat template (completion mode)' : 'chat template: unknown'));
  setStatus(parts.join(' · '), m.status === 'loaded' ? 'ok' : (m.status === 'failed' ? 'error' : 'warn'));
}

function setStatus(text, kind = '') {
  els.status.textContent = text;
  els.status.dataset.kind = kind;
}

// ---------- rendering ----------

function nearBottom() {
  const el = els.messages;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
}

function scrollDown(force) {
  if (force || nearBottom()) els.messages.scrollTop = els.messages.scrollHeight;
}

function addBubble(role, text, extraClass = '') {
  const div = document.createElement('div');
  div.className = `msg ${role}${extraClass ? ' ' + extraClass : ''}`;
  const content = document.createElement('div');
  content.className = 'content';
  content.textContent = text;
  div.append(content);
  els.messages.append(div);
  scrollDown(true);
  return div;
}

function addAssistantBubble(completion) {
  const div = addBubble('assistant', '', completion ? 'completion' : '');
  div.dataset.state = 'streaming';
  const meta = document.createElement('div');
  meta.className = 'meta';
  meta.textContent = 'waiting for first token…';
  div.append(meta);
  return div;
}

function setGenerating(on) {
  els.send.disabled = on;
  els.stop.disabled = !on;
  document.body.classList.toggle('generating', on);
}

// ---------- SSE over fetch ----------

async function errorMessage(res) {
  let msg = '';
  try {
    const text = await res.text();
    try { const j = JSON.parse(text); msg = j?.error?.message || j?.detail || text; } catch { msg = text; }
  } catch { /* ignore */ }
  if (typeof msg !== 'string') msg = JSON.stringify(msg);
  return `HTTP ${res.status}${res.statusText ? ' ' + res.statusText : ''}: ${msg || 'request failed'}`;
}

// Reads an SSE body, calling onData(dataString) for each event. Handles lines and
// UTF-8 sequences split across chunks, CRLF, comments and multi-line data fields.
async function readSSE(body, onData, onComment = () => {}) {
  const reader = body.getReader();
  const decoder = new TextDecoder('utf-8');
  let buffer = '';
  let dataLines = [];
  const dispatch = () => {
    if (dataLines.length) { const d = dataLines.join('\n'); dataLines = []; return onData(d); }
    return false;
  };
  const handleLine = (line) => {
    if (line.endsWith('\r')) line = line.slice(0, -1);
    if (line === '') return dispatch();
    if (line.startsWith(':')) { onComment(line.slice(1).trim()); return false; }  // e.g. "loading model X (3 s)"
    const idx = line.indexOf(':');
    const field = idx === -1 ? line : line.slice(0, idx);
    let value = idx === -1 ? '' : line.slice(idx + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') dataLines.push(value);
    return false;                                         // event:, id:, retry: ignored
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf('\n')) !== -1) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (handleLine(line) === true) { reader.cancel().catch(() => {}); return; }
      }
      if (done) {
        if (buffer) handleLine(buffer);
        dispatch();
        return;
      }
    }
  } finally {
    reader.releaseLock?.();
  }
}

// ---------- sending ----------

function numberOr(input, parse, fallback) {
  const v = parse(input.value);
  return Number.isFinite(v) ? v : fallback;
}

async function send() {
  if (controller) return;
  const m = selectedModel();
  const text = els.prompt.value;
  if (!m) { setStatus('Select a model first.', 'warn'); return; }
  if (!text.trim()) { els.prompt.focus(); return; }

  const chat = isChat(m);
  const params = {
    max_tokens: numberOr(els.maxTokens, (s) => parseInt(s, 10), 128),
    temperature: numberOr(els.temperature, parseFloat, 0.7),
  };
  let url, payload;
  const history = conversation;   // Clear during a request swaps the array; don't touch the new one
  if (chat) {
    history.push({ role: 'user', content: text });
    url = '/v1/chat/completions';
    payload = { model: m.id, messages: history.slice(), stream: true, ...params,
      stream_options: { include_usage: true } };
  } else {
    url = '/v1/completions';
    payload = { model: m.id, prompt: text, stream: true, ...params,
      stream_options: { include_usage: true } };
  }

  addBubble('user', text, chat ? '' : 'completion');
  const bubble = addAssistantBubble(!chat);
  const content = bubble.querySelector('.content');
  const meta = bubble.querySelector('.meta');
  els.prompt.value = '';

  controller = new AbortController();
  setGenerating(true);
  const t0 = performance.now();
  let tFirst = null, tLast = null, usage = null, finish = null, answer = '';
  let streamError = null, state = 'done';

  const fmt = (ms) => (ms / 1000).toFixed(2) + ' s';
  const renderMeta = () => {
    const parts = [];
    if (tFirst !== null) parts.push(`TTFT ${fmt(tFirst - t0)}`);
    const end = tLast ?? performance.now();
    if (usage) {
      parts.push(`prompt ${usage.prompt_tokens} · completion ${usage.completion_tokens} · total ${usage.total_tokens} tokens`);
      const n = usage.completion_tokens;
      if (n > 1 && tFirst !== null && end > tFirst) parts.push(`${((n - 1) * 1000 / (end - tFirst)).toFixed(1)} tok/s`);
      else if (n > 0 && end > t0) parts.push(`${(n * 1000 / (end - t0)).toFixed(1)} tok/s`);
    }
    parts.push(`time ${fmt(end - t0)}`);
    if (finish) parts.push(`finish: ${finish}`);
    meta.textContent = parts.join(' · ');
  };

  const onData = (data) => {
    if (data === '[DONE]') return true;
    let obj;
    try { obj = JSON.parse(data); } catch { return false; }   // ignore malformed events
    if (obj.error) {
      streamError = obj.error.message || JSON.stringify(obj.error);
      return true;
    }
    if (obj.usage) usage = obj.usage;
    const choice = Array.isArray(obj.choices) ? obj.choices[0] : null;
    if (choice) {
      const piece = chat ? choice.delta?.content : choice.text;
      if (piece) {
        const stick = nearBottom();
        if (tFirst === null) tFirst = performance.now();
        tLast = performance.now();
        answer += piece;
        content.textContent = answer;   // textContent only: never interpret model output
        scrollDown(stick);
        renderMeta();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    return false;
  };

  try {
    const res = await fetch(url, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      body: JSON.stringify(payload),
      signal: controller.signal,
    });
    if (!res.ok) {
      streamError = await errorMessage(res);
      if ([400, 404, 409].includes(res.status)) loadModels();  // model state may have changed
    } else if (!res.body) {
      streamError = 'Response has no body (streaming not supported).';
    } else {
      await readSSE(res.body, onData, (note) => { if (note) setStatus(note + '…', 'warn'); });
    }
  } catch (err) {
    if (err?.name === 'AbortError' || controller.signal.aborted) state = 'stopped';
    else streamError = `Request failed: ${err?.message || err}`;
  }

  if (streamError && state !== 'stopped') state = 'error';
  if (tLast === null) tLast = performance.now();
  renderMeta();

  if (state === 'error') {
    const err = document.createElement('div');
    err.className = 'error';
    err.textContent = streamError;
    bubble.insertBefore(err, meta);
  } else if (state === 'stopped') {
    const tag = document.createElement('span');
    tag.className = 'tag';
    tag.textContent = ' (stopped)';
    content.append(tag);
  }
  bubble.dataset.state = state;

  if (chat) {
    // Keep history alternating user/assistant; drop the user turn if nothing usable came back.
    if (answer && state !== 'error') history.push({ role: 'assistant', content: answer });
    else history.pop();
  }
  controller = null;
  setGenerating(false);
  scrollDown(false);
  els.prompt.focus();
}

function stop() {
  if (controller) controller.abort();
}

function clearAll() {
  if (controller) controller.abort();
  conversation = [];
  els.messages.replaceChildren();
  els.prompt.focus();
}

// ---------- wiring ----------

els.send.addEventListener('click', send);
els.stop.addEventListener('click', stop);
els.clear.addEventListener('click', clearAll);
els.refresh.addEventListener('click', loadModels);
els.model.addEventListener('change', updateModelInfo);
els.prompt.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});

setGenerating(false);
loadModels();
