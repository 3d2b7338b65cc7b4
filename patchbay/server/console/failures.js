// Failures: dead letters and quarantined events by flow and reason, with replay and discard; paused destinations.

import { api, can, needs, replayReport } from './api.js';
import {
  append, confirmDialog, emptyRow, errorBox, fill, flowLink, go, h, liveSection, pill, runLink, shortId, table, when,
} from './dom.js';
import { stateButton } from './flows.js';

// ============================================================================ failures
export async function viewFailures(root, r) {
  let flowList = [];
  try { flowList = (await api('flows')).flows; } catch { /* a runs-only token */ }
  const selected = new Set();
  const msg = h('div', { role: 'status', 'aria-live': 'polite' });
  const paused = h('div');
  const groups = h('div');
  const items = h('div');
  const fFlow = h('select', { id: 'd-flow' }, h('option', { value: '' }, 'any flow'),
    flowList.map((f) => h('option', { value: f.name }, f.name)));
  const dests = [...new Set(flowList.flatMap((f) => f.destinations.map((d) => d.name)))].sort();
  const fDest = h('select', { id: 'd-dest' }, h('option', { value: '' }, 'any destination'),
    dests.map((d) => h('option', { value: d }, d)));
  const reasonNote = h('span', { class: 'small' });
  const filters = () => ({ flow: r.query.get('flow') || '', destination: r.query.get('destination') || '',
    reason: r.query.get('reason') || '' });
  const setFilters = (next) => go('failures', { ...filters(), ...next });
  fFlow.addEventListener('change', () => setFilters({ flow: fFlow.value }));
  fDest.addEventListener('change', () => setFilters({ destination: fDest.value }));
  append(root,
    h('div', { class: 'title-row' }, h('h1', {}, 'Failures'),
      h('p', { class: 'lede' }, 'Dead letters (deliveries that failed for good), quarantined events (invalid records) and '
        + 'paused destinations. Replays and discards are recorded in the audit log.')),
    msg,
    h('section', { 'aria-labelledby': 'paused-h' }, h('h2', { id: 'paused-h' }, 'Paused destinations'), paused),
    h('section', { 'aria-labelledby': 'groups-h' }, h('h2', { id: 'groups-h' }, 'By flow and reason'), groups),
    h('section', { 'aria-labelledby': 'items-h' }, h('h2', { id: 'items-h' }, 'Dead letters and quarantined events'),
      h('form', { class: 'filters', onsubmit: (e) => e.preventDefault(), 'aria-label': 'Filter failures' },
        h('div', { class: 'field' }, h('label', { for: 'd-flow' }, 'Flow'), fFlow),
        h('div', { class: 'field' }, h('label', { for: 'd-dest' }, 'Destination'), fDest), reasonNote),
      items));

  const say = (text, tone = 'good') => fill(msg, h('p', { class: `notice ${tone}` }, text));
  const doReplay = async (body, what) => {
    try {
      const res = await api('dead-letters/replay', { method: 'POST', body });
      say(`${what}: ${replayReport(res)}`, res.requeued.length ? 'good' : 'warn');
      for (const id of res.requeued) selected.delete(id);
    } catch (err) { fill(msg, errorBox(err)); }
    await poll(true);
  };
  const doDiscard = async (list, what) => {
    const byDest = new Map();
    for (const it of list) {
      const k = it.kind === 'delivery' ? it.destination : '';
      byDest.set(k, [...(byDest.get(k) || []), it.event_id]);
    }
    if (!await confirmDialog(`Discard ${what}?`, `${list.length} run${list.length === 1 ? '' : 's'} will not be delivered. `
      + 'Each discard is recorded in the audit log.', 'Discard')) return;
    try {
      let done = 0;
      const skipped = [];
      for (const [dest, ids] of byDest) {
        const res = await api('dead-letters/discard', { method: 'POST', body: { run_ids: ids, destination: dest || undefined } });
        done += res.discarded.length;
        skipped.push(...res.skipped.map((x) => `${shortId(x.id)}: ${x.reason}`));
        for (const id of res.discarded) selected.delete(id);
      }
      say(`Discarded ${done}.${skipped.length ? ` Skipped ${skipped.join('; ')}.` : ''}`);
    } catch (err) { fill(msg, errorBox(err)); }
    await poll(true);
  };

  const refreshPaused = liveSection(paused, async () => (can('flows:read')
    ? (await api('destinations')).destinations.filter((d) => d.state !== 'active') : null), (list) => {
    if (list === null) return h('p', { class: 'muted' }, 'Needs a token with scope flows:read.');
    if (!list.length) return h('p', { class: 'muted' }, 'None: every destination is active.');
    return table(['Flow', 'Destination', 'State', 'Why', 'Since', 'Waiting', ''], list.map((d) => h('tr', {},
      h('td', {}, flowLink(d.flow)), h('td', {}, d.name), h('td', {}, pill(d.state)), h('td', {}, d.reason || '—'),
      h('td', {}, when(d.since)), h('td', { class: 'num' }, String(d.pending)),
      h('td', { class: 'nowrap' }, stateButton(d, () => poll(true))))));
  });

  let data = { items: [], groups: [], total: 0 };
  const renderItems = () => {
    const present = new Set(data.items.map((it) => it.event_id));
    for (const id of [...selected]) if (!present.has(id)) selected.delete(id);
    const chosen = data.items.filter((it) => selected.has(it.event_id));
    const all = h('input', { type: 'checkbox', id: 'sel-all', 'aria-label': 'Select all shown',
      checked: data.items.length > 0 && chosen.length === data.items.length,
      onchange: (e) => {
        for (const it of data.items) {
          if (e.target.checked) selected.add(it.event_id);
          else selected.delete(it.event_id);
        }
        renderItems();
      } });
    const f = filters();
    const scope = [f.flow && `flow ${f.flow}`, f.destination && `destination ${f.destination}`,
      f.reason && `reason “${f.reason}”`].filter(Boolean).join(', ');
    const bar = h('div', { class: 'actions bulk' },
      h('button', needs('runs:replay', { type: 'button', 'data-action': 'replay-selected', disabled: !chosen.length || !can('runs:replay'),
        onclick: () => doReplay({ run_ids: chosen.map((it) => it.event_id) }, `Replayed ${chosen.length} selected`) }),
      `Replay selected (${chosen.length})`),
      h('button', needs('runs:replay', { type: 'button', class: 'danger', 'data-action': 'discard-selected',
        disabled: !chosen.length || !can('runs:replay'), onclick: () => doDiscard(chosen, `${chosen.length} selected`) }),
      `Discard selected (${chosen.length})`),
      h('button', needs('runs:replay', { type: 'button', 'data-action': 'replay-all', disabled: !data.total || !can('runs:replay'),
        onclick: async () => {
          if (!await confirmDialog('Replay all matching?', `Every dead letter and quarantined event${scope ? ` with ${scope}` : ''} `
            + `(${data.total}) runs again through its flow as configured now.`, 'Replay all')) return;
          await doReplay({ all: true, flow: f.flow || undefined, destination: f.destination || undefined,
            reason: f.reason || undefined }, 'Replayed all matching');
        } }), `Replay all matching (${data.total})`));
    const rows = data.items.map((it) => h('tr', { 'data-run': it.event_id, 'data-kind': it.kind },
      h('td', {}, h('input', { type: 'checkbox', checked: selected.has(it.event_id), 'aria-label': `select ${it.event_id}`,
        onchange: (e) => { if (e.target.checked) selected.add(it.event_id); else selected.delete(it.event_id); renderItems(); } })),
      h('td', {}, runLink(it.event_id)), h('td', {}, flowLink(it.flow)),
      h('td', {}, it.kind === 'delivery' ? it.destination : pill('quarantined')),
      h('td', { class: 'key' }, it.record_key || '—'), h('td', { class: 'reason' }, it.reason),
      h('td', {}, when(it.at)), h('td', { class: 'num' }, String(it.attempts)),
      h('td', { class: 'nowrap' },
        h('button', needs('runs:replay', { type: 'button', class: 'small-btn', 'data-action': 'replay',
          onclick: () => doReplay({ run_ids: [it.event_id], destination: it.destination || undefined },
            `Replayed ${shortId(it.event_id)}`) }), 'Replay'), ' ',
        h('button', needs('runs:replay', { type: 'button', class: 'small-btn danger', 'data-action': 'discard',
          onclick: () => doDiscard([it], shortId(it.event_id)) }), 'Discard'))));
    const shown = data.items.length < data.total ? h('p', { class: 'muted small' },
      `Showing the newest ${data.items.length} of ${data.total}.`) : null;
    fill(items, bar, shown, table([all, 'Run', 'Flow', 'Destination', 'Record key', 'Reason', 'When', 'Attempts', ''],
      rows.length ? rows : emptyRow(9, scope ? `Nothing matches ${scope}.` : 'Nothing has failed. '), { class: 'dead' }));
  };
  let lastSig = null;
  const refreshDead = async (force) => {
    const f = filters();
    const res = await api('dead-letters', { params: { ...f, limit: 500 } });
    const sig = JSON.stringify(res);
    if (!force && sig === lastSig) return;
    lastSig = sig;
    data = res;
    fill(groups, table(['Kind', 'Flow', 'Destination', 'Reason', 'Count', 'First', 'Last', ''],
      res.groups.length ? res.groups.map((g) => h('tr', {},
        h('td', {}, pill(g.kind === 'delivery' ? 'dead' : 'quarantined', g.kind === 'delivery' ? 'dead letter' : 'quarantined')),
        h('td', {}, flowLink(g.flow)), h('td', {}, g.destination || '—'), h('td', { class: 'reason' }, g.reason),
        h('td', { class: 'num' }, String(g.count)), h('td', {}, when(g.first_at)), h('td', {}, when(g.last_at)),
        h('td', { class: 'nowrap' },
          h('button', { type: 'button', class: 'small-btn',
            onclick: () => setFilters({ flow: g.flow, destination: g.destination || '', reason: g.reason }) }, 'Show'), ' ',
          h('button', needs('runs:replay', { type: 'button', class: 'small-btn', 'data-action': 'replay-group',
            onclick: () => doReplay({ all: true, flow: g.flow, destination: g.destination || undefined, reason: g.reason },
              `Replayed ${g.count} × “${g.reason}”`) }), `Replay ${g.count}`))))
        : emptyRow(8, 'Nothing has failed.'), { class: 'compact' }));
    renderItems();
  };
  const poll = (force) => Promise.all([refreshDead(force), refreshPaused(force)]);
  const update = (route) => {
    r = route;
    const f = filters();
    fFlow.value = f.flow;
    fDest.value = f.destination;
    fill(reasonNote, ...(f.reason ? ['Reason starts with ', h('code', {}, f.reason), ' ',
      h('button', { type: 'button', class: 'small-btn', onclick: () => setFilters({ reason: '' }) }, 'Any reason')] : []));
    selected.clear();
    return poll(true).catch((err) => fill(items, errorBox(err)));
  };
  await update(r);
  return { update, poll: () => poll(false) };
}
