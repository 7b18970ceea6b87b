// What the page remembers across reloads, in localStorage: one conversation per model, the
// sampling settings, the selected model, what it learnt about each model, and the API key.
// Every access tolerates a disabled or full storage (private windows): the page then forgets.

const PREFIX = 'llm-chat.';

function read(name, fallback) {
  try {
    const raw = localStorage.getItem(PREFIX + name);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function write(name, value) {
  try {
    if (value === undefined || value === null || value === '') localStorage.removeItem(PREFIX + name);
    else localStorage.setItem(PREFIX + name, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

/** Turns `{role: 'user'|'assistant', content, state?, meta?}` per model id. */
export const conversations = {
  get(modelId) {
    const turns = read('conversations', {})[modelId];
    return Array.isArray(turns) ? turns.filter((t) => t && typeof t.content === 'string') : [];
  },
  set(modelId, turns) {
    const all = read('conversations', {});
    if (turns.length) all[modelId] = turns;
    else delete all[modelId];
    return write('conversations', all);
  },
};

export const DEFAULT_SETTINGS = Object.freeze({ temperature: 0.7, top_p: 1, max_tokens: '', base_format: 'transcript' });

export const settings = {
  get: () => ({ ...DEFAULT_SETTINGS, ...read('settings', {}) }),
  set: (value) => write('settings', value),
};

export const selected = {
  get: () => read('selected', null),
  set: (modelId) => write('selected', modelId),
};

/** Whether a model has a chat template, as last seen (an unloaded model does not say). */
export const chatTemplate = {
  get: (modelId) => read('chat-template', {})[modelId],
  set(modelId, value) {
    if (typeof value !== 'boolean') return;
    const all = read('chat-template', {});
    if (all[modelId] !== value) write('chat-template', { ...all, [modelId]: value });
  },
};

export const apiKey = {
  get: () => read('api-key', ''),
  set: (key) => write('api-key', (key || '').trim()),
};
