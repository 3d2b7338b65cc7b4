// DOM helpers: elements are built with createElement and text nodes only (never from HTML strings), so any
// value from the API, however odd, is shown as text and never run as markup.

const SVG_NS = 'http://www.w3.org/2000/svg';

function set(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value' && 'value' in el) el.value = v;
    else if (k === 'checked' && 'checked' in el) el.checked = Boolean(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function add(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replace `el`'s children (null, false and undefined are left out; strings become text). */
export function fill(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

/** Append to `el` (null, false and undefined are left out; strings become text). */
export function append(el, ...children) {
  add(el, children);
  return el;
}

/** An HTML element: h('a', {href: '#/map', class: 'x', onclick: fn}, 'text', child, [more]). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  set(el, attrs);
  add(el, children);
  return el;
}

/** An SVG element, same shape as h(). */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  set(el, attrs);
  add(el, children);
  return el;
}

const pad = (n) => String(n).padStart(2, '0');

/** Unix seconds as local `YYYY-MM-DD HH:MM:SS`. */
export function fmtTime(ts) {
  if (ts === null || ts === undefined) return '—';
  const d = new Date(ts * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** Unix seconds as "5 s ago", "3 min ago", "in 2 h". */
export function ago(ts) {
  if (ts === null || ts === undefined) return '—';
  const d = Date.now() / 1000 - ts;
  const a = Math.abs(d);
  const text = a < 60 ? `${Math.round(a)} s` : a < 3600 ? `${Math.round(a / 60)} min`
    : a < 86400 ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} d`;
  return d >= 0 ? `${text} ago` : `in ${text}`;
}

/** A <time> showing how long ago, with the exact local time as its title. */
export function when(ts) {
  if (ts === null || ts === undefined) return h('span', { class: 'muted' }, '—');
  return h('time', { datetime: new Date(ts * 1000).toISOString(), title: fmtTime(ts) }, ago(ts));
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return '—';
  return ms >= 1000 ? `${(ms / 1000).toFixed(ms >= 10000 ? 0 : 1)} s` : `${ms >= 10 ? Math.round(ms) : ms.toFixed(1)} ms`;
}

export function fmtPct(x) {
  if (x === null || x === undefined) return '—';
  const p = x * 100;
  return `${p === 100 || p === 0 ? p.toFixed(0) : p.toFixed(1)} %`;
}

export function fmtSeconds(sec) {
  if (sec === null || sec === undefined) return '—';
  if (sec < 1) return `${Math.round(sec * 1000)}ms`;
  if (sec < 60) return `${+sec.toFixed(1)}s`;
  if (sec < 3600) return `${+(sec / 60).toFixed(1)}m`;
  return `${+(sec / 3600).toFixed(1)}h`;
}

// Every status is shown as a word and a symbol as well as a colour.
const GLYPH = {
  ok: '✓', delivered: '✓', active: '✓', retrying: '↻', pending: '…', late: '◷', paused: '‖',
  disabled: '‖', failing: '✕', dead: '✕', quarantined: '⚠', filtered: '–', discarded: '–',
};

/** A status as a coloured pill with a symbol and its name. */
export function pill(status, label) {
  const st = String(status || 'unknown');
  return h('span', { class: `pill st-${st.replace(/[^a-z_-]/g, '')}` },
    h('span', { class: 'glyph', 'aria-hidden': 'true' }, GLYPH[st] || '•'), ' ', label ?? st);
}

/** Pretty JSON (or text) in a <pre>. */
export function code(value) {
  const text = typeof value === 'string' ? value : JSON.stringify(value, null, 2);
  return h('pre', { class: 'code' }, h('code', {}, text ?? ''));
}

/** A body that may be JSON text: pretty-printed when it parses. */
export function maybeJson(text) {
  if (typeof text !== 'string') return code(text);
  try { return code(JSON.parse(text)); } catch { return code(text); }
}

export function shortId(id) {
  const v = String(id || '');
  return v.length > 16 ? `${v.slice(0, 8)}…${v.slice(-6)}` : v;
}

/** A small modal question; resolves true when confirmed. */
export function confirmDialog(title, text, action) {
  return new Promise((resolve) => {
    const done = (v) => { dlg.close(); dlg.remove(); resolve(v); };
    const ok = h('button', { type: 'button', class: 'danger', onclick: () => done(true) }, action);
    const dlg = h('dialog', { class: 'confirm', 'aria-labelledby': 'dlg-title' },
      h('h2', { id: 'dlg-title' }, title), h('p', {}, text),
      h('div', { class: 'actions' },
        h('button', { type: 'button', onclick: () => done(false) }, 'Cancel'), ok));
    dlg.addEventListener('cancel', (e) => { e.preventDefault(); done(false); });
    document.body.append(dlg);
    dlg.showModal();
    ok.focus();
  });
}

export function errorBox(err) {
  const msg = err.status === 403 ? `This token may not do that. ${err.message}` : err.message;
  return h('p', { class: 'notice bad', role: 'alert' }, msg);
}

export function go(section, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v) q.set(k, v);
  const qs = q.toString();
  location.hash = `#/${section}${qs ? `?${qs}` : ''}`;
}

/** Re-render `el` from `fetcher()`'s answer, but only when the answer changed (keeps focus and scroll). */
export function liveSection(el, fetcher, render) {
  let last = null;
  return async (force) => {
    const data = await fetcher();
    const sig = JSON.stringify(data);
    if (!force && sig === last) return data;
    last = sig;
    fill(el, ...[render(data)].flat());
    return data;
  };
}

export function table(headers, rows, attrs) {
  return h('table', attrs || {},
    h('thead', {}, h('tr', {}, headers.map((x) => h('th', { scope: 'col' }, x)))),
    h('tbody', {}, rows));
}

export function emptyRow(n, text) {
  return h('tr', {}, h('td', { colspan: n, class: 'empty' }, text));
}

export function runLink(id) {
  return h('a', { href: `#/runs/${encodeURIComponent(id)}`, class: 'mono', title: id }, shortId(id));
}

export function flowLink(name) {
  return h('a', { href: `#/flows/${encodeURIComponent(name)}` }, name);
}
