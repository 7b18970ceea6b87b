// The conversation of the selected model: its bubbles, and one streamed request at a time
// (POST + SSE read from fetch's body stream; the Stop button aborts the fetch).

import { apiFetch, describeError, readError, readSSE } from './api.js';
import { StreamRun, fillContent } from './run.js';
import { isChatModel } from './models.js';
import { chatTemplate, conversations } from './store.js';

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A base model gets the conversation as a plain transcript it can continue. */
export function transcript(turns, text) {
  const lines = turns.map((t) => `${t.role === 'user' ? 'User' : 'Assistant'}: ${t.content}`);
  lines.push(`User: ${text}`, 'Assistant:');
  return lines.join('\n');
}

export function buildRequest(modelId, chat, history, text, params) {
  const common = { model: modelId, stream: true, stream_options: { include_usage: true },
    temperature: params.temperature, top_p: params.top_p };
  if (chat) {
    const messages = history.map(({ role, content }) => ({ role, content }));
    messages.push({ role: 'user', content: text });
    const body = { ...common, messages };
    if (params.max_tokens !== null) body.max_tokens = params.max_tokens;
    return { url: '/v1/chat/completions', body };
  }
  const raw = params.base_format === 'raw';
  // null: the model's default length (the completions endpoint would otherwise default to 16)
  const body = { ...common, prompt: raw ? text : transcript(history, text), max_tokens: params.max_tokens };
  if (!raw) body.stop = ['\nUser:'];
  return { url: '/v1/completions', body };
}

export class Chat {
  constructor(els, panel, readParams) {
    Object.assign(this, { els, panel, readParams });
    this.modelId = null;
    this.turns = [];
    this.controller = null;
  }

  show(modelId) {
    if (this.controller && modelId !== this.modelId) this.stop();
    this.modelId = modelId;
    this.turns = modelId ? conversations.get(modelId) : [];
    this.render();
  }

  render() {
    const nodes = this.turns.map((t) => this.bubble(t));
    if (!nodes.length) nodes.push(el('div', 'empty'));
    this.els.messages.replaceChildren(...nodes);
    this.updateMode();
    this.scroll(true);
  }

  /** The banner, placeholder and empty-state text for chat or base models (no bubble is rebuilt). */
  updateMode() {
    const info = this.panel.get(this.modelId);
    const chat = isChatModel(info);
    this.els.banner.hidden = !info || chat;
    this.els.banner.textContent = info && !chat
      ? `${info.id} is a base model (no chat template): it continues text. The page sends your conversation to /v1/completions as a "User: … / Assistant:" transcript (or, with "plain text", only your message).`
      : '';
    document.body.classList.toggle('base-mode', !!info && !chat);
    this.els.prompt.placeholder = chat ? 'Type a message…' : 'Type text for the model to continue…';
    const empty = this.els.messages.querySelector('.empty');
    if (!empty) return;
    if (!info) empty.textContent = 'Pick a model to start.';
    else if (chat) {
      const of = info.base ? ` (a LoRA adapter of ${info.base})` : '';
      empty.textContent = `New conversation with ${info.id}${of}. It is kept in this browser, one per model.`;
    }
    else empty.textContent = `${info.id} completes text: write the beginning and it carries on.`;
  }

  bubble(turn) {
    const div = el('article', `msg ${turn.role}${turn.mode === 'base' ? ' completion' : ''}`);
    div.dataset.role = turn.role;
    const content = div.appendChild(el('div', 'content'));
    if (turn.role === 'assistant') {
      div.dataset.state = turn.state || 'done';
      fillContent(content, turn.content, turn.mode === 'base');
      if (turn.state === 'stopped') div.append(el('div', 'tag', 'stopped'));
      div.append(el('div', 'meta', turn.meta || ''));
    } else {
      content.textContent = turn.content;
    }
    return div;
  }

  scroll(force = false) {
    const m = this.els.messages;
    if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 120) m.scrollTop = m.scrollHeight;
  }

  save(modelId, history) {
    if (!history.discarded) conversations.set(modelId, history);
  }

  setBusy(on) {
    this.els.send.disabled = on;
    this.els.stop.disabled = !on;
    document.body.classList.toggle('generating', on);
  }

  /** Send `text` as the next user turn; resolves when the reply ended (done, stopped or failed). */
  async send(text) {
    const info = this.panel.selected;
    if (this.controller || !text.trim()) return;
    if (!info) { this.panel.setStatus('Pick a model first.', 'warn'); return; }
    const params = this.readParams();
    if (!params) return;
    if (this.els.prompt.value === text) {
      this.els.prompt.value = '';
      this.els.prompt.style.height = '';  // back from the size it grew to
    }
    const chat = isChatModel(info);
    const turn = { modelId: this.modelId, history: this.turns, text, chat, mode: chat ? 'chat' : 'base' };
    const { url, body } = buildRequest(turn.modelId, chat, turn.history, text, params);
    this.els.messages.querySelector('.empty')?.remove();
    turn.user = { role: 'user', content: text, mode: turn.mode };
    turn.history.push(turn.user);
    this.save(turn.modelId, turn.history);
    turn.userBubble = this.els.messages.appendChild(this.bubble(turn.user));
    turn.view = this.els.messages.appendChild(this.bubble({ role: 'assistant', content: '', state: 'waiting', mode: turn.mode }));
    this.scroll(true);
    const run = new StreamRun(chat, turn.view, this.els.live, () => this.scroll());
    await this.stream(url, body, run);
    this.endTurn(turn, run);
  }

  /** POST and read the SSE reply into `run`; the Stop button aborts the fetch. */
  async stream(url, body, run) {
    const controller = (this.controller = new AbortController());
    this.setBusy(true);
    try {
      const res = await apiFetch(url, { method: 'POST', body, signal: controller.signal, accept: 'text/event-stream' });
      if (!res.ok) run.error = await readError(res);
      else await readSSE(res.body, (data) => run.onData(data), (note) => this.onProgress(run, note));
    } catch (err) {
      if (!controller.signal.aborted) run.error = { network: true, message: err?.message || String(err) };
    }
    run.finish(controller.signal.aborted);
    this.controller = null;
    this.setBusy(false);
  }

  /** Keep the turn if a reply came (also a stopped one); else drop it and give the text back. */
  endTurn(turn, run) {
    const { history, user, text } = turn;
    if (run.state !== 'error' && run.text) {
      history.push({ role: 'assistant', content: run.text, state: run.state, meta: run.metaText(), mode: turn.mode });
    } else {
      if (history.includes(user)) history.splice(history.indexOf(user), 1);
      turn.userBubble.classList.add('failed');
      if (!this.els.prompt.value) this.els.prompt.value = text;
    }
    this.save(turn.modelId, history);
    if (run.state === 'error') this.showError(run.error, turn);
    this.panel.refresh();  // memory, state (an autoload), running requests
  }

  onProgress(run, note) {
    run.onProgress(note);
    if (/^loading model/i.test(note) && this.panel.get(this.modelId)?.status !== 'loading') this.panel.refresh();
  }

  showError(err, { modelId, text, userBubble, view, chat }) {
    const retry = async () => {
      userBubble.remove();
      view.remove();
      if (this.els.prompt.value === text) this.els.prompt.value = '';
      if (modelId === this.modelId) await this.send(text);
    };
    if (chat && err.status === 400 && err.param === 'messages' && /chat template/i.test(err.message)) {
      chatTemplate.set(modelId, false);  // learnt: a base model; send again as a completion
      this.panel.render();
      this.render();
      if (this.els.prompt.value === text) this.els.prompt.value = '';
      this.send(text);
      return;
    }
    if (err.status === 401 || err.status === 403) this.panel.onAuthError?.();
    const { title, text: sentence } = describeError(err);
    const box = el('div', 'error');
    box.setAttribute('role', 'alert');
    box.append(el('strong', '', `${title}:`), el('span', '', ` ${sentence}`));
    if (err.status === 429 || err.status === 503 || err.network) box.append(retryButton(err.retryAfter, retry));
    if (err.status === 409 && err.code === 'model_not_loaded') {
      const load = el('button', 'error-action', `Load ${modelId}`);
      load.type = 'button';
      load.addEventListener('click', async () => {
        load.disabled = true;
        await this.panel.transition(modelId, 'load');
        if (this.panel.get(modelId)?.status === 'loaded') await retry();
        else load.disabled = false;
      });
      box.append(load);
    }
    view.insertBefore(box, view.querySelector('.meta'));
    this.scroll();
  }

  stop() {
    this.controller?.abort();
  }

  clear() {
    this.stop();
    this.turns.discarded = true;  // a reply still finishing must not write the old turns back
    this.turns = [];
    conversations.set(this.modelId, []);
    this.render();
  }
}

function retryButton(seconds, retry) {
  const button = el('button', 'error-action', 'Retry');
  button.type = 'button';
  let left = Math.ceil(seconds || 0);
  const tick = () => {
    button.disabled = left > 0;
    button.textContent = left > 0 ? `Retry in ${left} s` : 'Retry';
    if (left-- > 0) setTimeout(tick, 1000);
  };
  tick();
  button.addEventListener('click', () => { button.disabled = true; retry(); });
  return button;
}
