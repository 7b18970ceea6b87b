// A small Markdown subset rendered as DOM nodes. Model text reaches the page only through text
// nodes and textContent (never innerHTML), so `<script>` or `<img onerror>` in a reply stays text;
// links keep only http(s) and mailto URLs.
//
// Blocks: fenced code (``` or ~~~, unclosed while streaming), headings, lists, quotes, rules,
// paragraphs (line breaks kept). Inline: `code`, **bold**, *italic*, ~~strike~~, [links](url), URLs.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const SAFE_URL = /^(https?:\/\/|mailto:)/i;
const INLINE = new RegExp([
  '(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)',              // 1,2 code
  '\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*',                   // 3 bold
  '(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])',        // 4 bold
  '\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*',                 // 5 italic
  '(?<![\\w])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\w])',  // 6 italic
  '~~(?=\\S)([\\s\\S]*?\\S)~~',                           // 7 strike
  '\\[([^\\]\\n]+)\\]\\(\\s*([^\\s)]+)\\s*\\)',           // 8,9 link
  '(https?:\\/\\/[^\\s<>"]*[^\\s<>".,;:!?\'()\\]])',      // 10 bare URL
].join('|'), 'g');

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function link(text, url) {
  if (!SAFE_URL.test(url)) return document.createTextNode(text === url ? url : `${text} (${url})`);
  const a = el('a', '', text);
  a.href = url;
  a.target = '_blank';
  a.rel = 'noopener noreferrer nofollow';
  return a;
}

/** Inline markup of one piece of text, appended to `parent`. */
export function renderInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    if (m[1]) parent.append(el('code', '', m[2].replace(/^ (.*) $/s, '$1')));
    else if (m[3] !== undefined || m[4] !== undefined) renderInline(parent.appendChild(el('strong')), m[3] ?? m[4]);
    else if (m[5] !== undefined || m[6] !== undefined) renderInline(parent.appendChild(el('em')), m[5] ?? m[6]);
    else if (m[7] !== undefined) renderInline(parent.appendChild(el('del')), m[7]);
    else if (m[8] !== undefined) parent.append(link(m[8], m[9]));
    else parent.append(link(m[10], m[10]));
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function inlineLines(parent, lines) {
  lines.forEach((line, i) => {
    if (i) parent.append(el('br'));
    renderInline(parent, line);
  });
  return parent;
}

function codeBlock(lines, start, fence) {
  const marker = fence[1];
  const body = [];
  let i = start + 1;
  let closed = false;
  for (; i < lines.length; i++) {
    const line = lines[i];
    if (line.trim().startsWith(marker[0].repeat(marker.length)) && /^\s*[`~]+\s*$/.test(line)) { closed = true; i++; break; }
    body.push(line);
  }
  const wrap = el('div', closed ? 'code-block' : 'code-block open');
  const head = el('div', 'code-head');
  head.append(el('span', 'code-lang', fence[2] || 'code'));
  const copy = el('button', 'code-copy', 'Copy');
  copy.type = 'button';
  copy.dataset.code = body.join('\n');
  head.append(copy);
  const code = el('code', fence[2] ? `language-${fence[2]}` : '', body.join('\n') + (body.length ? '\n' : ''));
  const pre = el('pre');
  pre.append(code);
  wrap.append(head, pre);
  return [wrap, i];
}

function list(lines, start) {
  const ordered = /\d/.test(LIST_ITEM.exec(lines[start])[2]);
  const node = el(ordered ? 'ol' : 'ul');
  let i = start;
  let item = null;
  for (; i < lines.length; i++) {
    const line = lines[i];
    const m = LIST_ITEM.exec(line);
    if (m && /\d/.test(m[2]) === ordered) {
      if (ordered && !item) node.start = Number.parseInt(m[2], 10) || 1;
      item = node.appendChild(el('li'));
      renderInline(item, m[3]);
    } else if (item && line.trim() && /^\s+/.test(line) && !FENCE.test(line)) {
      item.append(el('br'));
      renderInline(item, line.trim());  // an indented continuation line
    } else {
      break;
    }
  }
  return [node, i];
}

function isBlockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || LIST_ITEM.test(line) || QUOTE.test(line);
}

/** A DocumentFragment holding `text` rendered as Markdown. */
export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, '\n').split('\n');
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = FENCE.exec(line))) { const [node, next] = codeBlock(lines, i, m); frag.append(node); i = next; continue; }
    if ((m = HEADING.exec(line))) { renderInline(frag.appendChild(el(`h${Math.min(m[1].length + 2, 6)}`)), m[2]); i++; continue; }
    if (RULE.test(line)) { frag.append(el('hr')); i++; continue; }
    if (LIST_ITEM.test(line)) { const [node, next] = list(lines, i); frag.append(node); i = next; continue; }
    if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) quoted.push(m[1]);
      frag.appendChild(el('blockquote')).append(renderMarkdown(quoted.join('\n')));
      continue;
    }
    const para = [];
    for (; i < lines.length && lines[i].trim() && (!para.length || !isBlockStart(lines[i])); i++) para.push(lines[i]);
    frag.append(inlineLines(el('p'), para));
  }
  return frag;
}
