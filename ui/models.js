// The model list: one card per configured model with its state badge, memory, and Load/Unload;
// a pool's LoRA adapters are listed right under their base (a nested list), each with its own card.
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

/** Whether a model takes chat messages: what it says when loaded, else what it said before
 * (an adapter, that says nothing of it, has its base's template). */
export function isChatModel(info) {
  if (!info) return true;
  if (typeof info.has_chat_template === 'boolean') return info.has_chat_template;
  const learnt = chatTemplate.get(info.id);
  if (typeof learnt === 'boolean') return learnt;
  return !info.base || chatTemplate.get(info.base) !== false;
}

export const isAdapter = (m) => m?.kind === 'adapter' || !!m?.base;

/**
 * The list's order: each model, then its adapters; adapters whose base is not listed come in a
 * group of their own (at the place of the first of them). Returns
 * [{ model, adapters: [...] } | { orphanBase: id, adapters: [...] }].
 */
export function groupModels(models) {
  const ids = new Set(models.filter((m) => !isAdapter(m)).map((m) => m.id));
  const adaptersOf = new Map();
  for (const m of models) {
    if (!isAdapter(m)) continue;
    const base = m.base || '';
    if (!adaptersOf.has(base)) adaptersOf.set(base, []);
    adaptersOf.get(base).push(m);
  }
  const groups = [];
  const placed = new Set();
  for (const m of models) {
    if (!isAdapter(m)) {
      groups.push({ model: m, adapters: adaptersOf.get(m.id) || [] });
    } else if (!ids.has(m.base || '') && !placed.has(m.base || '')) {
      placed.add(m.base || '');
      groups.push({ orphanBase: m.base || '', adapters: adaptersOf.get(m.base || '') });
    }
  }
  return groups;
}

/** Where a pool member is resident now: its replicas' ids. */
function heldText(m) {
  const held = Array.isArray(m.held_by) ? m.held_by.filter((r) => typeof r === 'string') : [];
  if (!held.length) return '';
  return held.length === 1 ? `on ${held[0]}` : `on ${held.length} replicas: ${held.join(', ')}`;
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
  if (m.pool) parts.push(`pool ${m.pool}`);
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
    const items = [];
    for (const group of groupModels(this.models)) {
      if (group.model) items.push(this.card(group.model));
      if (group.adapters.length) items.push(this.adapterGroup(group));
    }
    if (!items.length) items.push(el('li', 'model-empty', 'No models configured.'));
    this.keepUnchangedCards(items);
    const same = items.length === this.list.children.length && items.every((item, i) => item === this.list.children[i]);
    if (!same) this.list.replaceChildren(...items);
  }

  /** A card that a poll did not change stays the same element: no flicker, and a card being clicked,
   *  scrolled to or focused is not swapped out from under the user. */
  keepUnchangedCards(items) {
    const before = [...this.list.children];
    const kept = new Set();
    items.forEach((item, i) => {  // a whole entry (a card, or a base's adapter list) that did not change
      const prev = before.find((b) => !kept.has(b) && b.isEqualNode(item));
      if (prev) { items[i] = prev; kept.add(prev); }
    });
    const old = new Map();
    for (const b of before) if (!kept.has(b)) for (const c of b.matches('.model-card') ? [b] : b.querySelectorAll('.model-card')) old.set(c.dataset.model, c);
    for (const item of items) {
      if (kept.has(item) || item.matches('.model-card')) continue;
      for (const c of item.querySelectorAll('.model-card')) {
        const prev = old.get(c.dataset.model);
        if (prev && prev.isEqualNode(c)) c.replaceWith(prev);
      }
    }
    items.forEach((item, i) => {
      if (!kept.has(item) && item.matches('.model-card')) {
        const prev = old.get(item.dataset.model);
        if (prev && prev.isEqualNode(item)) items[i] = prev;
      }
    });
  }

  /** A nested list of adapters, under their base's card or under a heading naming the base. */
  adapterGroup({ model, orphanBase, adapters }) {
    const li = el('li', 'adapter-group');
    const list = el('ul', 'adapter-list');
    if (model) {
      li.dataset.base = model.id;
      list.setAttribute('aria-label', `Adapters of ${model.id}`);
    } else {
      li.dataset.base = orphanBase;
      li.classList.add('orphan');
      const heading = el('h3', 'adapter-base');
      heading.id = `adapters-of-${this.list.id}-${orphanBase.replace(/[^A-Za-z0-9_-]/g, '_')}`;
      const name = el('span', 'model-name', orphanBase || '(no base)');
      const note = el('span', 'model-kind', 'base not listed');
      note.title = 'This base model is not served here: its adapters are';
      heading.append(name, ' ', note);
      list.setAttribute('aria-labelledby', heading.id);
      li.append(heading);
    }
    list.append(...adapters.map((a) => this.card(a, { underBase: !!model })));
    li.append(list);
    return li;
  }

  /** One model's card; `underBase`: an adapter shown under its base's card (which names the pool). */
  card(m, { underBase = false } = {}) {
    const status = this.pending.get(m.id) || m.status || 'unknown';
    const adapter = isAdapter(m);
    const li = el('li', adapter ? 'model-card adapter-card' : 'model-card');
    li.dataset.model = m.id;
    li.dataset.status = status;
    li.dataset.kind = adapter ? 'adapter' : 'model';
    if (adapter && m.base) li.dataset.base = m.base;
    if (m.id === this.selectedId) li.setAttribute('aria-current', 'true');

    const pick = el('button', 'model-select');
    pick.type = 'button';
    pick.title = adapter ? `Chat with ${m.id} (LoRA adapter of ${m.base || 'an unknown base'})` : `Chat with ${m.id}`;
    const name = el('span', 'model-name', m.id);
    let kind;
    if (adapter) {
      kind = el('span', 'model-kind adapter-badge', 'adapter');
      kind.title = `LoRA adapter of ${m.base || 'an unknown base'}`;
    } else {
      kind = el('span', 'model-kind', isChatModel(m) ? 'chat' : 'base');
      kind.title = isChatModel(m) ? 'has a chat template' : 'no chat template: completes text';
    }
    pick.append(name, kind);
    pick.addEventListener('click', () => this.onSelect(m.id));

    const badge = el('span', 'badge', status);
    badge.dataset.status = status;
    if (m.error) badge.title = m.error;
    const info = el('span', 'model-memory', [heldText(m), adapter ? '' : memoryText(m)].filter(Boolean).join(' · '));
    if (m.pool) info.title = `Pool ${m.pool}: the replicas holding it now`;
    const details = el('span', 'model-details', detailText(underBase ? { ...m, pool: null } : m));

    const loaded = status === 'loaded';
    const verb = loaded ? 'Unload' : 'Load';
    const action = el('button', 'model-action', verb);
    action.type = 'button';
    action.dataset.action = loaded ? 'unload' : 'load';
    action.setAttribute('aria-label', `${verb} ${m.id}`);
    action.disabled = TRANSIENT.has(status);
    action.addEventListener('click', () => this.transition(m.id, loaded ? 'unload' : 'load'));

    const row = el('div', 'model-row');
    row.append(badge, info, action);
    li.append(pick, row);
    if (details.textContent) li.append(details);
    if (m.error && status === 'failed') li.append(el('span', 'model-error', m.error));
    return li;
  }
}
