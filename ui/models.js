// The model list: one card per configured model with its state badge, memory, and Load/Unload.
// GET /models is polled while a model is loading or unloading.

import { apiFetch, describeError, readError } from './api.js';
import { chatTemplate } from './store.js';

const TRANSIENT = new Set(['loading', 'unloading']);
const POLL_MS = 800;

export function formatBytes(n) {
  if (!Number.isFinite(n) || n <= 0) return '0 B';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  const i = Math.min(units.length - 1, Math.floor(Math.log2(n) / 10));
  const value = n / 2 ** (10 * i);
  return `${value >= 100 || i === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[i]}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Whether a model takes chat messages: what it says when loaded, else what it said before. */
export function isChatModel(info) {
  if (!info) return true;
  if (typeof info.has_chat_template === 'boolean') return info.has_chat_template;
  return chatTemplate.get(info.id) !== false;
}

function memoryText(m) {
  if (m.status === 'loaded' && m.resident_memory_bytes > 0) return `${formatBytes(m.resident_memory_bytes)} resident`;
  if (m.status === 'loaded' && m.weights_bytes > 0) return `${formatBytes(m.weights_bytes)} weights`;
  if (m.measured_bytes) return `last load held ${formatBytes(m.measured_bytes)}`;
  if (m.memory_estimate?.need_bytes) return `needs ~${formatBytes(m.memory_estimate.need_bytes)}`;
  return '';
}

function detailText(m) {
  const parts = [];
  if (m.context_length) parts.push(`ctx ${m.context_length}`);
  if (m.quantization && m.status === 'loaded') parts.push(m.quantization);
  if (m.num_running_requests) parts.push(`${m.num_running_requests} running`);
  return parts.join(' · ');
}

export class ModelPanel {
  constructor({ list, status, refreshButton, onSelect, onUpdate, onAuthError }) {
    Object.assign(this, { list, status, onSelect, onUpdate, onAuthError });
    this.models = [];
    this.selectedId = null;
    this.pending = new Map();  // model id -> 'loading' | 'unloading' while our request runs
    this.timer = null;
    refreshButton.addEventListener('click', () => this.refresh());
  }

  get(id) {
    return this.models.find((m) => m.id === id) || null;
  }

  get selected() {
    return this.get(this.selectedId);
  }

  async refresh() {
    clearTimeout(this.timer);
    try {
      const res = await apiFetch('/models');
      if (!res.ok) throw await readError(res);
      const body = await res.json();
      this.models = Array.isArray(body.data) ? body.data : [];
      for (const m of this.models) chatTemplate.set(m.id, m.has_chat_template);
      this.setStatus('');
    } catch (err) {
      const { title, text } = describeError(err instanceof Error ? { network: true, message: err.message } : err);
      this.setStatus(`${title}: ${text}`, 'error');
      if (err.status === 401 || err.status === 403) this.onAuthError?.();
    }
    this.render();
    this.onUpdate?.();
    const busy = this.pending.size || this.models.some((m) => TRANSIENT.has(m.status));
    if (busy) this.timer = setTimeout(() => this.refresh(), POLL_MS);
  }

  setStatus(text, kind = '') {
    this.status.textContent = text;
    this.status.dataset.kind = kind;
  }

  select(id) {
    if (!this.get(id) && this.models.length) id = this.models[0].id;
    this.selectedId = id;
    this.render();
  }

  async transition(id, action) {
    if (this.pending.has(id)) return;
    this.pending.set(id, action === 'load' ? 'loading' : 'unloading');
    this.render();
    this.timer = setTimeout(() => this.refresh(), POLL_MS);  // shows the state while we wait
    try {
      const res = await apiFetch(`/${action}`, { method: 'POST', body: action === 'load' ? { model: id } : { model: id, force: false } });
      if (!res.ok) {
        const err = await readError(res);
        const { title, text } = describeError(err);
        this.setStatus(`${action === 'load' ? 'Load' : 'Unload'} ${id} failed — ${title}: ${text}`, 'error');
        if (err.status === 401 || err.status === 403) this.onAuthError?.();
      }
    } catch (err) {
      this.setStatus(`Could not reach the server: ${err.message}`, 'error');
    } finally {
      this.pending.delete(id);
    }
    await this.refresh();
  }

  render() {
    const cards = this.models.map((m) => this.card(m));
    if (!cards.length) cards.push(el('li', 'model-empty', 'No models configured.'));
    this.list.replaceChildren(...cards);
  }

  card(m) {
    const status = this.pending.get(m.id) || m.status || 'unknown';
    const li = el('li', 'model-card');
    li.dataset.model = m.id;
    li.dataset.status = status;
    if (m.id === this.selectedId) li.setAttribute('aria-current', 'true');

    const pick = el('button', 'model-select');
    pick.type = 'button';
    pick.title = `Chat with ${m.id}`;
    const name = el('span', 'model-name', m.id);
    const kind = el('span', 'model-kind', isChatModel(m) ? 'chat' : 'base');
    kind.title = isChatModel(m) ? 'has a chat template' : 'no chat template: completes text';
    pick.append(name, kind);
    pick.addEventListener('click', () => this.onSelect(m.id));

    const badge = el('span', 'badge', status);
    badge.dataset.status = status;
    if (m.error) badge.title = m.error;
    const memory = el('span', 'model-memory', memoryText(m));
    const details = el('span', 'model-details', detailText(m));

    const loaded = status === 'loaded';
    const action = el('button', 'model-action', loaded ? 'Unload' : 'Load');
    action.type = 'button';
    action.dataset.action = loaded ? 'unload' : 'load';
    action.disabled = TRANSIENT.has(status);
    action.addEventListener('click', () => this.transition(m.id, loaded ? 'unload' : 'load'));

    const row = el('div', 'model-row');
    row.append(badge, memory, action);
    li.append(pick, row, details);
    if (m.error && status === 'failed') li.append(el('span', 'model-error', m.error));
    return li;
  }
}
