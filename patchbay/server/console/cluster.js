// Cluster: the hub's processes on this store (nodes), their roles, heartbeat and the claims each holds.

import { api } from './api.js';
import { append, emptyRow, h, liveSection, pill, table, when } from './dom.js';

const STATUS = { up: 'ok', lost: 'failing', stopped: 'disabled' };

function nodeRow(n, self) {
  return h('tr', { 'data-node': n.id, 'data-status': n.status },
    h('th', { scope: 'row', class: 'mono' }, n.id, n.id === self ? h('span', { class: 'muted' }, ' (answering)') : null),
    h('td', {}, n.roles.join(', ')),
    h('td', {}, pill(STATUS[n.status] || n.status, n.status)),
    h('td', {}, when(n.heartbeat_at)),
    h('td', { class: 'num', 'data-claims': String(n.claims) }, String(n.claims)),
    h('td', {}, n.leases.length ? n.leases.join(', ') : '—'),
    h('td', { class: 'mono' }, n.port ? `${n.host}:${n.port}` : n.host, h('span', { class: 'muted' }, ` pid ${n.pid}`)),
    h('td', {}, n.version));
}

export async function viewCluster(root) {
  const body = h('div');
  append(root,
    h('div', { class: 'title-row' }, h('h1', {}, 'Cluster'),
      h('p', { class: 'lede' }, 'The hub’s processes on this store: what each runs (web, worker, scheduler), its last '
        + 'heartbeat, and the deliveries it holds claimed. A node without a heartbeat for a while is lost.')),
    body);
  const refresh = liveSection(body, () => api('cluster'), (c) => [
    table(['Node', 'Roles', 'Status', 'Heartbeat', 'Claims', 'Leases', 'Address', 'Version'],
      c.nodes.length ? c.nodes.map((n) => nodeRow(n, c.node)) : emptyRow(8, 'No nodes yet.'),
      { class: 'cluster-nodes' }),
    h('p', { class: 'muted small' }, `Heartbeat every ${c.heartbeat_s} s; lost after ${c.lost_after_s} s without one.`),
  ]);
  await refresh(true);
  return { poll: () => refresh(false) };
}
