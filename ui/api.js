// HTTP for the page: every fetch carries the API key; errors in OpenAI's shape
// `{"error": {message, type, param, code}}` become one object; SSE is read from a POST's body.

import { apiKey } from './store.js';

export function apiFetch(path, { method = 'GET', body, signal, accept = 'application/json' } = {}) {
  const headers = { Accept: accept };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const key = apiKey.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  return fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
}

function retryAfterSeconds(header) {
  if (!header) return null;
  const seconds = Number.parseFloat(header);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const at = Date.parse(header);  // Retry-After may also be an HTTP date
  return Number.isFinite(at) ? Math.max(0, Math.ceil((at - Date.now()) / 1000)) : null;
}

/** `{status, message, type, code, param, retryAfter}` from a failed response. */
export async function readError(res) {
  let text = '';
  try { text = await res.text(); } catch { /* the body is gone */ }
  let err;
  try {
    const json = JSON.parse(text);
    err = json && typeof json.error === 'object' && json.error ? json.error : { message: json?.detail ?? text };
  } catch {
    err = { message: text };
  }
  if (typeof err.message !== 'string') err.message = JSON.stringify(err.message);
  return {
    status: res.status,
    message: err.message || res.statusText || 'request failed',
    type: err.type || null,
    code: err.code || null,
    param: err.param || null,
    retryAfter: retryAfterSeconds(res.headers.get('Retry-After')),
  };
}

/** An error event sent inside a stream (`data: {"error": {...}}`, then `data: [DONE]`). */
export function streamError(error) {
  return {
    status: null, inStream: true, message: String(error?.message || 'the stream failed'),
    type: error?.type || null, code: error?.code || null, param: error?.param || null, retryAfter: null,
  };
}

/** A short title and a sentence saying what happened and what to do. */
export function describeError(err) {
  const where = err.param ? ` (${err.param})` : '';
  const status = err.status ? ` (${err.status})` : '';
  if (err.network) return { title: 'Server unreachable', text: `Could not reach the server: ${err.message}` };
  if (err.inStream) return { title: 'Generation failed', text: `The stream ended with an error${err.code ? ` (${err.code})` : ''}: ${err.message}` };
  if (err.status === 401 || err.status === 403) {
    return { title: `Not authorised${status}`, text: `${err.message} — enter a valid API key under Settings.` };
  }
  if (err.status === 429 || err.status === 503) {
    const when = err.retryAfter !== null ? ` Retry in ${Math.ceil(err.retryAfter)} s.` : ' Retry in a moment.';
    const what = err.code === 'model_unloading' ? 'Model unloading' : err.code === 'model_loading' ? 'Model loading' : 'Server busy';
    return { title: `${what}${status}`, text: `${err.message.replace(/[.\s]+$/, '')}.${when}` };
  }
  if (err.status === 409) return { title: `Model not loaded${status}`, text: err.message };
  if (err.status === 413) return { title: `Too long${status}`, text: `${err.message} — clear the conversation or shorten the message.` };
  if (err.status === 507) return { title: `Not enough memory${status}`, text: `${err.message} — unload another model first.` };
  if (err.status === 400 && /context length|KV cache/i.test(err.message)) {
    return { title: `Too long${status}`, text: `${err.message} — clear the conversation or lower max_tokens.` };
  }
  return { title: `Error${status}${where}`, text: err.message };
}

/**
 * Read an SSE body: `onData(data)` for each event (return true to stop), `onComment(text)` for
 * comment lines such as `: loading model X (3 s)`. Handles lines and UTF-8 sequences split
 * across chunks, CRLF and multi-line data fields.
 */
export async function readSSE(body, onData, onComment = () => {}) {
  const reader = body.getReader();
  const decoder = new TextDecoder('utf-8');
  let buffer = '';
  let dataLines = [];
  const dispatch = () => {
    if (!dataLines.length) return false;
    const data = dataLines.join('\n');
    dataLines = [];
    return onData(data) === true;
  };
  const handleLine = (raw) => {
    const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (line === '') return dispatch();
    if (line.startsWith(':')) { onComment(line.slice(1).trim()); return false; }
    const idx = line.indexOf(':');
    const field = idx === -1 ? line : line.slice(0, idx);
    let value = idx === -1 ? '' : line.slice(idx + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') dataLines.push(value);
    return false;  // event:, id:, retry: are not used by this API
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf('\n')) !== -1) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (handleLine(line)) { reader.cancel().catch(() => {}); return; }
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
