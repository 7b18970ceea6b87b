// One streamed reply: parses the SSE events of /v1/chat/completions or /v1/completions, paints the
// text as it grows (at most once a frame), and measures time to first token and tokens per second.

import { streamError } from './api.js';
import { renderMarkdown } from './markdown.js';

/** Model text into a bubble: Markdown as DOM nodes for chat, the plain text for a base model. */
export function fillContent(node, text, plain) {
  if (plain) node.textContent = text;
  else node.replaceChildren(renderMarkdown(text));
}

const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;

export class StreamRun {
  constructor(chat, view, live, onGrow) {
    Object.assign(this, { chat, view, live, onGrow });
    this.content = view.querySelector('.content');
    this.meta = view.querySelector('.meta');
    this.progress = null;
    this.t0 = performance.now();
    this.tFirst = null;
    this.tLast = null;
    this.loadStarted = null;
    this.text = '';
    this.numDeltas = 0;
    this.usage = null;
    this.finishReason = null;
    this.error = null;
    this.state = 'waiting';
    this.frame = 0;
    this.meta.textContent = 'waiting for the first token…';
    this.live.textContent = '';
  }

  /** One SSE data field; returns true at `[DONE]`. An error event is followed by `[DONE]`. */
  onData(data) {
    if (data === '[DONE]') return true;
    let event;
    try { event = JSON.parse(data); } catch { return false; }
    if (!event || typeof event !== 'object') return false;
    if (event.error) { this.error = streamError(event.error); return false; }
    if (event.usage) this.usage = event.usage;
    const choice = Array.isArray(event.choices) ? event.choices[0] : null;
    if (choice) {
      const piece = this.chat ? choice.delta?.content : choice.text;
      if (typeof piece === 'string' && piece) this.onText(piece);
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
    return false;
  }

  /** A comment line, e.g. `loading model X (3 s)` while the model autoloads. */
  onProgress(note) {
    if (!note || this.tFirst !== null) return;
    if (this.loadStarted === null) this.loadStarted = performance.now();
    if (!this.progress) {
      this.progress = document.createElement('div');
      this.progress.className = 'progress';
      this.view.insertBefore(this.progress, this.content);
    }
    this.progress.textContent = `${note.charAt(0).toUpperCase()}${note.slice(1)}…`;
    this.setState('loading');
    this.meta.textContent = 'the model is loading; the reply starts when it is ready';
  }

  onText(piece) {
    const now = performance.now();
    if (this.tFirst === null) {
      this.tFirst = now;
      this.setState('streaming');
      this.progress?.remove();
    }
    this.tLast = now;
    this.text += piece;
    this.numDeltas += 1;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.paint());
  }

  paint() {
    this.frame = 0;
    fillContent(this.content, this.text, !this.chat);
    this.meta.textContent = this.metaText();
    this.live.textContent = this.liveText();
    this.onGrow();
  }

  setState(state) {
    this.state = state;
    this.view.dataset.state = state;
  }

  finish(aborted) {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    if (this.tLast === null) this.tLast = performance.now();
    this.progress?.remove();
    this.setState(aborted ? 'stopped' : this.error ? 'error' : 'done');
    this.paint();
    if (aborted) this.view.insertBefore(tag('stopped'), this.meta);
    else if (!this.text && !this.error) this.view.insertBefore(tag('the model returned no text'), this.meta);
  }

  numTokens() {
    return this.usage?.completion_tokens ?? this.numDeltas;
  }

  tokensPerSecond(end) {
    const n = this.numTokens();
    if (this.tFirst === null || n < 2 || end <= this.tFirst) return null;
    return ((n - 1) * 1000) / (end - this.tFirst);  // decode rate: tokens after the first
  }

  liveText() {
    if (this.tFirst === null) return '';
    const rate = this.tokensPerSecond(performance.now());
    const parts = [`TTFT ${seconds(this.tFirst - this.t0)}`];
    if (rate !== null) parts.push(`${this.usage ? '' : '~'}${rate.toFixed(1)} tok/s`);
    return parts.join(' · ');
  }

  metaText() {
    const end = this.state === 'streaming' || this.state === 'waiting' ? performance.now() : this.tLast;
    const parts = [];
    if (this.tFirst !== null) parts.push(`TTFT ${seconds(this.tFirst - this.t0)}`);
    if (this.loadStarted !== null && this.tFirst !== null) parts.push(`waited ${seconds(this.tFirst - this.loadStarted)} for the model to load`);
    const rate = this.tokensPerSecond(end);
    if (rate !== null) parts.push(`${rate.toFixed(1)} tok/s`);
    const n = this.numTokens();
    if (n) parts.push(`${this.usage ? '' : '~'}${n} token${n === 1 ? '' : 's'}`);
    parts.push(seconds(end - this.t0));
    if (this.finishReason) parts.push(`finish: ${this.finishReason}`);
    return parts.join(' · ');
  }
}

function tag(text) {
  const node = document.createElement('div');
  node.className = 'tag';
  node.textContent = text;
  return node;
}
