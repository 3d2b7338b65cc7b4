// The Patchbay console: a token login, then the map, flows, runs, failures and the cluster, all read from /api/v1.
// Routes live in the URL fragment (#/runs/evt_...), so the hub serves one page and links can be shared.

import { api, can, forgetToken, keepToken, onUnauthorized, session } from './api.js';
import { append, errorBox, fill, fmtTime, h } from './dom.js';
import { viewCluster } from './cluster.js';
import { viewFailures } from './failures.js';
import { viewFlow, viewFlows, viewMap } from './flows.js';
import { viewIdentities } from './identity.js';
import { viewRun, viewRuns } from './runs.js';

const POLL_MS = 2000;
const app = {
  view: null, // {name, key, poll?, update?}
  gen: 0, // bumped on every navigation: answers for an older page are dropped
  busy: false,
  timer: null,
};
const $main = document.getElementById('main');
const $header = document.getElementById('top');
const $live = document.getElementById('live');

// ============================================================================ sign in and out
function signOut(reason) {
  forgetToken();
  app.view = null;
  app.gen++;
  clearTimeout(app.timer);
  showLogin(reason);
}

function showLogin(reason) {
  $header.hidden = true;
  $live.hidden = true;
  const input = h('input', {
    id: 'token', name: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true,
    placeholder: 'pbt_…', 'aria-describedby': 'token-help',
  });
  const msg = h('p', { class: 'notice bad', role: 'alert', hidden: !reason }, reason || '');
  const button = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'login', onsubmit: async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    button.disabled = true;
    msg.hidden = true;
    try {
      const res = await fetch('/api/v1/whoami', { headers: { Authorization: `Bearer ${token}` }, cache: 'no-store' });
      const data = await res.json().catch(() => null);
      if (!res.ok) throw new Error(data?.message || `HTTP ${res.status}`);
      keepToken(token);
      session.me = data.token;
      if (!location.hash || location.hash === '#/login') history.replaceState(null, '', '#/map');
      start();
    } catch (err) {
      msg.textContent = `Sign-in failed: ${err.message}`;
      msg.hidden = false;
      input.select();
    } finally {
      button.disabled = false;
    }
  } },
  h('h1', {}, 'Patchbay console'),
  h('p', {}, 'Every system, flow, run and failure of this hub.'),
  msg,
  h('label', { for: 'token' }, 'API token'),
  input,
  h('p', { id: 'token-help', class: 'muted small' },
    'Create one on the hub’s machine, for example ',
    h('code', {}, 'patchbay tokens create console --scope flows:read --scope runs:read --scope runs:replay '
      + '--scope runs:start --scope destinations:write'),
    '. It stays in this browser tab only (session storage) and is sent as a Bearer token.'),
  button);
  fill($main, form);
  document.title = 'Sign in · Patchbay';
  input.focus();
}

// ============================================================================ shell, polling, routing
function renderHeader() {
  const me = session.me;
  const links = [['map', 'Map'], ['flows', 'Flows'], ['runs', 'Runs'], ['failures', 'Failures']];
  if (can('identities:read')) links.push(['identities', 'Identities']);
  if (can('flows:read')) links.push(['cluster', 'Cluster']);
  fill($header,
    h('a', { class: 'brand', href: '#/map' }, 'Patchbay'),
    h('nav', { 'aria-label': 'Main' }, h('ul', {}, links.map(([k, label]) => h('li', {},
      h('a', { href: `#/${k}`, 'data-nav': k }, label, k === 'failures'
        ? h('span', { id: 'fail-badge', class: 'badge', hidden: true }) : null))))),
    h('p', { id: 'counts', class: 'counts', 'aria-live': 'polite' }),
    h('div', { class: 'who' },
      h('span', { title: `token ${me.id}, created ${fmtTime(me.created_at)} by ${me.created_by || '—'}`
        + (me.expires_at ? `, expires ${fmtTime(me.expires_at)}` : ', never expires') },
      'Token ', h('strong', { id: 'who-name' }, me.name), ' ', h('span', { class: 'muted' }, `(${me.id})`), ' · ',
      h('span', { id: 'who-scopes' }, me.scopes.join(', '))),
      h('button', { type: 'button', onclick: () => signOut('Signed out.') }, 'Sign out')));
  $header.hidden = false;
  $live.hidden = false;
  setLive('ok', `Live: updates every ${POLL_MS / 1000} s`);
  refreshCounts().catch(() => { /* shown by the next poll */ });
}

function markNav(name) {
  const section = { flow: 'flows', run: 'runs' }[name] || name;
  for (const a of $header.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

async function refreshCounts() {
  if (!can('runs:read')) return;
  const c = await api('counts');
  const ev = c.events;
  const parts = [
    [ev.delivered || 0, 'delivered', 'delivered'], [ev.pending || 0, 'pending', 'pending'],
    [c.dead_letters, 'dead letters', 'dead'], [c.paused_destinations, 'paused', 'paused'],
  ];
  const el = document.getElementById('counts');
  if (el) {
    fill(el, ...parts.flatMap(([n, label, st], i) => [i ? ' · ' : '',
      h('span', { class: n && st !== 'delivered' ? `count c-${st}` : 'count' }, h('strong', {}, String(n)), ` ${label}`)]));
  }
  const badge = document.getElementById('fail-badge');
  const n = c.dead_letters + c.paused_destinations;
  if (badge) {
    badge.hidden = !n;
    badge.textContent = String(n);
    badge.setAttribute('aria-label', `${n} to look at`);
  }
}

function setLive(state, text) {
  $live.className = `live ${state}`;
  $live.textContent = text;
}

function schedulePoll() {
  clearTimeout(app.timer);
  if (session.token) app.timer = setTimeout(tick, POLL_MS);
}

async function tick() {
  clearTimeout(app.timer);
  if (!session.token || !session.me) return;
  if (document.hidden) {
    setLive('idle', 'Updates paused while this tab is hidden.');
    return; // visibilitychange starts it again
  }
  if (!app.busy) {
    app.busy = true;
    const gen = app.gen;
    try {
      await Promise.all([refreshCounts(), app.view?.poll ? app.view.poll() : null]);
      if (gen === app.gen) setLive('ok', `Live: updates every ${POLL_MS / 1000} s · last ${fmtTime(Date.now() / 1000)}`);
    } catch (err) {
      if (err.status !== 401) setLive('bad', `Not updating: ${err.message}`);
    } finally {
      app.busy = false;
    }
  }
  schedulePoll();
}

document.addEventListener('visibilitychange', () => { if (!document.hidden) tick(); });

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/map';
  const [path, qs] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map((p) => { try { return decodeURIComponent(p); } catch { return p; } });
  return { parts, query: new URLSearchParams(qs || '') };
}


async function route() {
  if (!session.token) { showLogin(); return; }
  if (!session.me) {
    try {
      session.me = (await api('whoami')).token;
    } catch (err) {
      if (err.status !== 401) fill($main, errorBox(err));
      return;
    }
  }
  if ($header.hidden || !$header.childElementCount) renderHeader();
  const r = parseHash();
  const [a, b] = r.parts;
  let name = a || 'map';
  if (a === 'flows' && b) name = 'flow';
  if (a === 'runs' && b) name = 'run';
  const view = VIEWS[name] || notFound;
  const key = `${name}/${b || ''}`;
  markNav(name);
  if (app.view && app.view.key === key && app.view.update) {
    app.view.update(r);
    schedulePoll();
    return;
  }
  app.gen++;
  const gen = app.gen;
  const alive = () => gen === app.gen;
  const root = h('div', { class: `view view-${name}` });
  fill($main, root);
  app.view = { key, name };
  try {
    const v = await view(root, r, alive);
    if (!alive()) return;
    app.view = { key, name, ...(v || {}) };
    const h1 = root.querySelector('h1');
    document.title = `${h1 ? h1.textContent : name} · Patchbay`;
    if (h1 && !root.contains(document.activeElement)) { // tell screen readers the page changed
      h1.setAttribute('tabindex', '-1');
      h1.focus({ preventScroll: true });
    }
  } catch (err) {
    if (!alive() || err.status === 401) return;
    append(root, errorBox(err));
  }
  schedulePoll();
}

function start() {
  renderHeader();
  route();
}

window.addEventListener('hashchange', route);
onUnauthorized(signOut);

async function notFound(root) {
  append(root, h('h1', {}, 'Not found'), h('p', {}, 'No such page. ', h('a', { href: '#/map' }, 'Go to the map')));
}

const VIEWS = {
  map: viewMap, flows: viewFlows, flow: viewFlow, runs: viewRuns, run: viewRun, failures: viewFailures,
  identities: viewIdentities, cluster: viewCluster,
};

if (session.token) start();
else showLogin();
