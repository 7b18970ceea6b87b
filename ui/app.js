// Chat page entry: wires the model list, the conversation, the settings and the keyboard.
// Plain ES modules, no build step: chat.js (conversation and streaming), run.js (one reply),
// models.js (model list), markdown.js (safe rendering), api.js (HTTP, SSE), store.js (localStorage).

import { Chat } from './chat.js';
import { ModelPanel, isAdapter } from './models.js';
import { apiKey, selected, settings } from './store.js';

const $ = (id) => document.getElementById(id);
const els = {
  messages: $('messages'), prompt: $('prompt'), send: $('send'), stop: $('stop'), clear: $('clear'),
  live: $('live'), banner: $('mode-banner'), composer: $('composer'), current: $('current-model'),
  temperature: $('temperature'), topP: $('top_p'), maxTokens: $('max_tokens'), baseFormat: $('base-format'),
  apiKey: $('api-key'), showKey: $('show-key'), drawer: $('models-toggle'),
};

const panel = new ModelPanel({
  list: $('model-list'), status: $('models-status'), refreshButton: $('refresh'),
  onSelect: selectModel, onUpdate: onModelsUpdated, onAuthError: askForKey,
});
const chat = new Chat(els, panel, readParams);

// ---------- models ----------

function selectModel(id) {
  panel.select(id);
  selected.set(panel.selectedId);
  chat.show(panel.selectedId);
  updateHeader();
  setDrawer(false);
  els.prompt.focus();
}

function onModelsUpdated() {
  if (!panel.models.length) return;
  if (!panel.get(chat.modelId)) {
    const remembered = selected.get();
    const first = panel.models.find((m) => m.status === 'loaded') || panel.models[0];
    selectModel(panel.get(remembered) ? remembered : first.id);
    return;
  }
  chat.updateMode();
  updateHeader();
}

function updateHeader() {
  const m = panel.selected;
  els.current.replaceChildren();
  if (!m) return;
  const badge = document.createElement('span');
  badge.className = 'badge';
  badge.dataset.status = panel.pending.get(m.id) || m.status;
  badge.textContent = badge.dataset.status;
  els.current.append(m.id, ' ');
  if (isAdapter(m)) {
    const tag = document.createElement('span');
    tag.className = 'model-kind adapter-badge';
    tag.textContent = 'adapter';
    tag.title = `LoRA adapter of ${m.base || 'an unknown base'}`;
    els.current.append(tag, ' ');
  }
  els.current.append(badge);
}

function askForKey() {
  setDrawer(true);
  els.apiKey.focus();
  els.apiKey.select();
}

function setDrawer(open) {
  document.body.classList.toggle('drawer-open', open);
  els.drawer.setAttribute('aria-expanded', String(open));
}

// ---------- sampling settings ----------

function readParams() {
  for (const input of [els.temperature, els.topP, els.maxTokens]) {
    if (!input.checkValidity()) { input.reportValidity(); return null; }
  }
  const maxTokens = Number.parseInt(els.maxTokens.value, 10);
  return {
    temperature: Number.parseFloat(els.temperature.value),
    top_p: Number.parseFloat(els.topP.value),
    max_tokens: Number.isFinite(maxTokens) ? maxTokens : null,
    base_format: els.baseFormat.value,
  };
}

function restoreSettings() {
  const s = settings.get();
  els.temperature.value = s.temperature;
  els.topP.value = s.top_p;
  els.maxTokens.value = s.max_tokens;
  els.baseFormat.value = s.base_format === 'raw' ? 'raw' : 'transcript';
  els.apiKey.value = apiKey.get();
}

function saveSettings() {
  settings.set({
    temperature: els.temperature.value, top_p: els.topP.value,
    max_tokens: els.maxTokens.value, base_format: els.baseFormat.value,
  });
}

// ---------- wiring ----------

function submit() {
  chat.send(els.prompt.value);
}

els.composer.addEventListener('submit', (e) => { e.preventDefault(); submit(); });
els.stop.addEventListener('click', () => chat.stop());
els.clear.addEventListener('click', () => { chat.clear(); els.prompt.focus(); });
els.prompt.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  else if (e.key === 'Escape') chat.stop();
});
els.prompt.addEventListener('input', () => {
  els.prompt.style.height = 'auto';
  els.prompt.style.height = `${Math.min(els.prompt.scrollHeight + 2, window.innerHeight * 0.4)}px`;
});
for (const input of [els.temperature, els.topP, els.maxTokens, els.baseFormat]) input.addEventListener('change', saveSettings);
els.apiKey.addEventListener('change', () => { apiKey.set(els.apiKey.value); panel.refresh(); });
$('settings').addEventListener('submit', (e) => { e.preventDefault(); els.apiKey.blur(); });  // blur: 'change' saves
els.showKey.addEventListener('click', () => {
  const hidden = els.apiKey.type === 'password';
  els.apiKey.type = hidden ? 'text' : 'password';
  els.showKey.textContent = hidden ? 'Hide' : 'Show';
});
els.drawer.addEventListener('click', () => setDrawer(!document.body.classList.contains('drawer-open')));
els.messages.addEventListener('click', async (e) => {
  const button = e.target.closest('.code-copy');
  if (!button) return;
  try {
    await navigator.clipboard.writeText(button.dataset.code || '');
    button.textContent = 'Copied';
  } catch {
    button.textContent = 'Copy failed';
  }
  setTimeout(() => { button.textContent = 'Copy'; }, 1500);
});
document.addEventListener('visibilitychange', () => { if (!document.hidden) panel.refresh(); });

restoreSettings();
chat.setBusy(false);
chat.render();
panel.refresh();
