// Runs: the search, and one run's trace with where and why it stopped.

import { api, can, needs, replayReport } from './api.js';
import {
  ago, append, code, confirmDialog, emptyRow, errorBox, fill, flowLink, fmtMs, fmtSeconds, fmtTime, go, h, liveSection,
  maybeJson, pill, runLink, table, when,
} from './dom.js';

const RUN_STATUSES = ['pending', 'delivered', 'dead', 'quarantined', 'filtered', 'discarded', 'aggregated'];
const RANGES = { '': 'any time', '15m': 'last 15 min', '1h': 'last hour', '24h': 'last 24 h', '7d': 'last 7 days',
  custom: 'between…' };
const RANGE_S = { '15m': 900, '1h': 3600, '24h': 86400, '7d': 604800 };

// ============================================================================ runs
export function fmtRows(n) {
  return n === null || n === undefined ? '—' : Number(n).toLocaleString('en');
}

/** A finished batch run's report, as the run's page and the flow's page show it. */
export function reportView(rep) {
  const rate = rep.duration_s ? Math.round(rep.read / rep.duration_s) : 0;
  const status = rep.status === 'ok' ? 'delivered' : 'dead';
  return h('section', { class: `batch-report ${rep.status === 'ok' ? 'good' : 'bad'}`, 'aria-label': 'Run report',
    'data-status': rep.status },
  h('h3', {}, 'Report ', pill(status, rep.status)),
  rep.error ? h('p', { class: 'notice bad' }, rep.error) : null,
  table(['Read', 'Inserted', 'Updated', 'Unchanged', 'Deleted', 'Quarantined', 'Filtered', 'Duration'],
    [h('tr', {}, [rep.read, rep.inserted, rep.updated, rep.unchanged, rep.deleted, rep.quarantined, rep.filtered]
      .map((n) => h('td', { class: 'num' }, fmtRows(n))),
    h('td', { class: 'num' }, `${fmtSeconds(rep.duration_s)} (${fmtRows(rate)} rows/s)`))], { class: 'compact report' }),
  h('dl', { class: 'facts' },
    h('dt', {}, 'Mode'), h('dd', {}, rep.mode),
    h('dt', {}, 'Cursor'), h('dd', {}, `${rep.cursor_from || '(start)'} → ${rep.cursor_to || '—'}`),
    h('dt', {}, 'Schema'), h('dd', {}, rep.schema_changes?.length ? rep.schema_changes.join('; ') : 'unchanged')));
}


export function runsTable(runs, withFlow = true) {
  const rows = runs.map((r) => h('tr', { 'data-run': r.id, 'data-status': r.status },
    h('td', {}, h('time', { title: ago(r.received_at) }, fmtTime(r.received_at))),
    h('td', {}, runLink(r.id)),
    withFlow ? h('td', {}, flowLink(r.flow)) : null,
    h('td', { class: 'key' }, r.record_key || h('span', { class: 'muted' }, '—')),
    h('td', {}, pill(r.status)),
    h('td', { class: 'num' }, `${r.deliveries} / ${r.attempts}`),
    h('td', { class: 'reason' }, r.reason || '')));
  const heads = ['Received', 'Run', withFlow ? 'Flow' : null, 'Record key', 'Status', 'Deliveries / attempts', 'Reason']
    .filter(Boolean);
  return table(heads, rows.length ? rows : emptyRow(heads.length, 'No runs match.'), { class: 'runs' });
}

export async function viewRuns(root, r) {
  let flows = [];
  try { flows = (await api('flows')).flows.map((f) => f.name); } catch { /* a runs-only token */ }
  const f = {
    flow: h('select', { id: 'f-flow', name: 'flow' }, h('option', { value: '' }, 'any flow'),
      flows.map((n) => h('option', { value: n }, n))),
    status: h('select', { id: 'f-status', name: 'status' }, h('option', { value: '' }, 'any status'),
      RUN_STATUSES.map((s) => h('option', { value: s }, s))),
    key: h('input', { id: 'f-key', name: 'key', type: 'search', placeholder: 'e.g. ada@example.com', size: 26 }),
    range: h('select', { id: 'f-range', name: 'range' },
      Object.entries(RANGES).map(([k, v]) => h('option', { value: k }, v))),
    since: h('input', { id: 'f-since', name: 'since', type: 'datetime-local', step: 1 }),
    until: h('input', { id: 'f-until', name: 'until', type: 'datetime-local', step: 1 }),
    limit: h('select', { id: 'f-limit', name: 'limit' }, [50, 200, 1000].map((n) => h('option', { value: n }, String(n)))),
  };
  const custom = h('span', { class: 'custom-range' }, h('label', { for: 'f-since' }, 'from'), f.since,
    h('label', { for: 'f-until' }, 'until'), f.until);
  const field = (id, label, el) => h('div', { class: 'field' }, h('label', { for: id }, label), el);
  const submit = () => {
    const range = f.range.value;
    go('runs', {
      flow: f.flow.value, status: f.status.value, key: f.key.value.trim(), range,
      since: range === 'custom' ? f.since.value : '', until: range === 'custom' ? f.until.value : '',
      limit: f.limit.value === '50' ? '' : f.limit.value,
    });
  };
  const form = h('form', { class: 'filters', role: 'search', 'aria-label': 'Search runs',
    onsubmit: (ev) => { ev.preventDefault(); submit(); } },
  field('f-key', 'Record key', f.key), field('f-flow', 'Flow', f.flow), field('f-status', 'Status', f.status),
  field('f-range', 'Received', f.range), custom, field('f-limit', 'Show', f.limit),
  h('button', { type: 'submit', class: 'primary' }, 'Search'),
  h('button', { type: 'button', onclick: () => go('runs') }, 'Clear'));
  for (const el of [f.flow, f.status, f.range, f.limit]) {
    el.addEventListener('change', () => { if (el !== f.range || f.range.value !== 'custom') submit(); custom.hidden = f.range.value !== 'custom'; });
  }
  const summary = h('p', { class: 'muted', role: 'status' });
  const results = h('div');
  append(root, h('div', { class: 'title-row' }, h('h1', {}, 'Runs'),
    h('p', { class: 'lede' }, 'Every event each flow received, newest first. Updates live.')), form, summary, results);

  let q = null;
  let refresh = null;
  const update = (route) => {
    q = route.query;
    f.flow.value = q.get('flow') || '';
    f.status.value = q.get('status') || '';
    f.key.value = q.get('key') || '';
    f.range.value = q.get('range') || '';
    f.since.value = q.get('since') || '';
    f.until.value = q.get('until') || '';
    f.limit.value = q.get('limit') || '50';
    custom.hidden = f.range.value !== 'custom';
    refresh = liveSection(results, () => {
      const range = q.get('range');
      const params = { flow: q.get('flow'), status: q.get('status'), key: q.get('key'), limit: q.get('limit') };
      if (RANGE_S[range]) params.since = new Date(Date.now() - RANGE_S[range] * 1000).toISOString();
      if (range === 'custom') {
        if (q.get('since')) params.since = new Date(q.get('since')).toISOString();
        if (q.get('until')) params.until = new Date(q.get('until')).toISOString();
      }
      return api('runs', { params });
    }, (data) => {
      const n = data.runs.length;
      const filters = ['flow', 'status', 'key'].filter((k) => q.get(k)).map((k) => `${k} ${q.get(k)}`);
      if (q.get('range') === 'custom') {
        if (q.get('since')) filters.push(`received from ${q.get('since').replace('T', ' ')}`);
        if (q.get('until')) filters.push(`until ${q.get('until').replace('T', ' ')}`);
      } else if (q.get('range')) filters.push(`received in the ${RANGES[q.get('range')] || q.get('range')}`);
      summary.textContent = `${n}${n >= Number(q.get('limit') || 50) ? '+' : ''} run${n === 1 ? '' : 's'}`
        + (filters.length ? ` matching ${filters.join(', ')}` : '') + ', newest first.';
      return runsTable(data.runs);
    });
    return refresh().catch((err) => { fill(results, errorBox(err)); });
  };
  await update(r);
  return { update, poll: () => refresh() };
}

// ---------------------------------------------------------------------------- one run
/** Where a run stopped and why: `{tone, text, stepIndex?, deliveries: {id: note}}`. */
function diagnose(run, destStates) {
  const trace = run.trace || [];
  if (run.meta?.batch) {
    const rep = trace.find((t) => t.kind === 'batch')?.output || {};
    if (rep.status === 'ok') {
      return { tone: 'good', step: -1, deliveries: new Map(), lines: [`Batch run ok: read ${fmtRows(rep.read)}, `
        + `inserted ${fmtRows(rep.inserted)}, updated ${fmtRows(rep.updated)}, deleted ${fmtRows(rep.deleted)}, `
        + `quarantined ${fmtRows(rep.quarantined)}; written in one transaction.`] };
    }
    return { tone: 'bad', step: 0, deliveries: new Map(), lines: [`Batch run ${rep.status || 'failed'}: ${rep.error || run.reason}`,
      'Nothing of it was written: the destination and the cursor are as the last good run left them. '
      + 'Fix the cause, then run the flow again.'] };
  }
  const bad = trace.findIndex((t) => t.error);
  const dropped = trace.findIndex((t) => t.dropped);
  const out = { tone: 'neutral', lines: [], step: -1, deliveries: new Map() };
  if (run.status === 'quarantined' && bad >= 0) {
    const t = trace[bad];
    out.tone = 'bad';
    out.step = bad;
    out.lines.push(`Stopped at step ${t.step} (${t.kind}): the record is invalid and was quarantined.`);
    for (const e of t.error) out.lines.push(e);
    out.lines.push('Fix the sender or the flow, then replay; nothing was sent to any destination.');
    return out;
  }
  if (run.status === 'quarantined') {
    out.tone = 'bad';
    out.lines.push(`Quarantined: ${run.reason}`);
    return out;
  }
  if (run.status === 'filtered') {
    out.step = dropped >= 0 ? dropped : trace.length - 1;
    out.lines.push(`Filtered, not delivered: ${run.reason || 'no destination matched'}. This is not a failure.`);
    return out;
  }
  if (run.status === 'discarded') {
    out.lines.push('Discarded by an operator: it will not be delivered.');
    return out;
  }
  for (const d of run.deliveries) {
    const last = d.attempts_log[d.attempts_log.length - 1];
    const answer = last ? (last.status_code ? `HTTP ${last.status_code}` : last.error || last.outcome) : null;
    const st = destStates.get(d.destination);
    if (d.status === 'dead') {
      out.tone = 'bad';
      out.deliveries.set(d.id, 'stop');
      out.lines.push(`Delivery to ${d.destination} failed permanently after ${d.attempts} attempt${d.attempts === 1 ? '' : 's'}`
        + `: ${d.last_error || answer}.`);
      if (last?.excerpt) out.lines.push(`${d.destination} answered: ${last.excerpt}`);
      out.lines.push('Fix the destination or the data, then replay this run.');
    } else if (d.status === 'pending' && st && st.state !== 'active') {
      if (out.tone !== 'bad') out.tone = 'warn';
      out.deliveries.set(d.id, 'wait');
      out.lines.push(`Waiting: destination ${d.destination} is ${st.state}${st.reason ? ` (${st.reason})` : ''}. `
        + 'Resume it to deliver.');
    } else if (d.status === 'pending' && d.attempts > 0) {
      if (out.tone !== 'bad') out.tone = 'warn';
      out.deliveries.set(d.id, 'wait');
      out.lines.push(`Retrying ${d.destination}: attempt ${d.attempts} got ${d.last_error || answer}; `
        + `next attempt ${ago(d.next_at)} (${fmtTime(d.next_at)}).`);
    } else if (d.status === 'pending') {
      if (out.tone !== 'bad') out.tone = 'warn';
      out.lines.push(`Delivering to ${d.destination}…`);
    }
  }
  if (run.status === 'delivered') {
    out.tone = 'good';
    const n = run.deliveries.length;
    out.lines.unshift(`Delivered to ${n === 1 ? run.deliveries[0].destination : `all ${n} destinations`}.`);
  }
  if (!out.lines.length) out.lines.push(`Status: ${run.status}.`);
  return out;
}

function runActions(run, after) {
  const msg = h('span', { role: 'status', class: 'small' });
  const replayable = run.status === 'dead' || run.status === 'quarantined';
  if (!replayable) return h('div', { class: 'actions' });
  const replay = h('button', needs('runs:replay', {
    type: 'button', class: 'primary', 'data-action': 'replay',
    onclick: async () => {
      replay.disabled = true;
      try {
        const res = await api('dead-letters/replay', { method: 'POST', body: { run_ids: [run.id] } });
        msg.textContent = replayReport(res);
        await after();
      } catch (err) { fill(msg, errorBox(err)); replay.disabled = false; }
    },
  }), 'Replay');
  const discard = h('button', needs('runs:replay', {
    type: 'button', class: 'danger', 'data-action': 'discard',
    onclick: async () => {
      if (!await confirmDialog('Discard this run?', `Run ${run.id} will not be delivered. The discard is recorded in `
        + 'the audit log.', 'Discard')) return;
      try {
        const res = await api('dead-letters/discard', { method: 'POST', body: { run_ids: [run.id] } });
        msg.textContent = res.discarded.length ? 'Discarded.' : `Not discarded: ${res.skipped.map((x) => x.reason).join('; ')}`;
        await after();
      } catch (err) { fill(msg, errorBox(err)); }
    },
  }), 'Discard');
  return h('div', { class: 'actions' }, replay, discard, msg,
    h('span', { class: 'muted small' }, 'Replay runs the stored payload through the flow as configured now.'));
}

function traceStep(t, i, stop, previous) {
  const cls = ['step', stop ? 'stop' : '', t.error ? 'failed' : '', t.skipped ? 'skipped' : ''].filter(Boolean).join(' ');
  const title = t.kind === 'route' ? 'Route to destinations' : `Step ${t.step}`;
  const body = [];
  if (t.skipped) body.push(h('p', { class: 'muted' }, 'Skipped: its `when` condition did not match.'));
  if (t.error) body.push(h('ul', { class: 'errors' }, t.error.map((e) => h('li', {}, e))));
  if (t.dropped) body.push(h('p', {}, `Dropped: ${t.dropped}`));
  if (t.drift) {
    body.push(h('p', {}, "The event differs from the flow's input contract:"),
      h('ul', { class: 'errors' }, t.drift.map((d) => h('li', {}, d))));
  }
  if (t.routes) {
    body.push(h('ul', { class: 'routes' }, t.routes.map((rt) => h('li', {},
      rt.matched ? pill('delivered', 'matched') : pill('filtered', 'not matched'), ' ', rt.destination))));
  }
  if (t.output !== undefined) {
    const same = JSON.stringify(t.output) === JSON.stringify(previous);
    body.push(h('details', { open: !same }, h('summary', {}, same ? 'Output (unchanged)' : 'Output'), code(t.output)));
  }
  return h('li', { class: cls, 'data-step': i },
    h('div', { class: 'step-head' }, h('h3', {}, title, t.kind !== 'route' ? h('span', { class: 'muted' }, ` (${t.kind})`) : null),
      t.ms !== undefined ? h('span', { class: 'muted small' }, fmtMs(t.ms)) : null,
      stop ? h('strong', { class: 'stop-mark' }, 'Stopped here') : null),
    body);
}

function deliveryStep(d, note) {
  const attempts = d.attempts_log.map((a, i) => {
    const last = i === d.attempts_log.length - 1;
    const failed = a.outcome !== 'success';
    return h('tr', { class: last && note === 'stop' ? 'stop' : '', 'data-attempt': a.n },
      h('td', { class: 'num' }, String(a.n)),
      h('td', {}, fmtTime(a.started_at)),
      h('td', {}, a.status_code ? h('strong', {}, String(a.status_code)) : '—'),
      h('td', {}, pill(failed ? (a.outcome === 'transient' ? 'retrying' : 'dead') : 'delivered', a.outcome)),
      h('td', { class: 'num' }, fmtMs(a.latency_ms)),
      h('td', { class: 'excerpt' }, a.excerpt ? h('code', {}, a.excerpt) : null,
        a.error && a.error !== `HTTP ${a.status_code}` ? h('div', { class: 'small' }, a.error) : null));
  });
  const req = d.request || {};
  return h('li', { class: `step delivery ${note === 'stop' ? 'stop failed' : ''} ${note === 'wait' ? 'wait' : ''} `
    + `${d.status === 'delivered' ? 'done' : ''}`,
    'data-delivery': d.destination },
  h('div', { class: 'step-head' }, h('h3', {}, `Delivery to ${d.destination}`), pill(d.status),
    note === 'stop' ? h('strong', { class: 'stop-mark' }, 'Stopped here') : null),
  h('p', { class: 'small' }, req.method ? [h('code', {}, `${req.method} ${req.url || ''}`), ' · '] : null,
    'idempotency key ', h('code', {}, d.idempotency_key),
    d.status === 'pending' && d.attempts ? [' · next attempt ', when(d.next_at)] : null),
  req.body !== undefined ? h('details', {}, h('summary', {}, 'Request body'), maybeJson(req.body)) : null,
  d.attempts_log.length
    ? table(['#', 'Started', 'Status', 'Outcome', 'Latency', 'Response excerpt'], attempts, { class: 'attempts compact' })
    : h('p', { class: 'muted' }, 'No attempt yet.'));
}

export async function viewRun(root, r) {
  const id = r.parts[1];
  const body = h('div');
  append(root, body);
  const refresh = liveSection(body, async () => {
    const run = await api(`runs/${encodeURIComponent(id)}`);
    let dests = [];
    if (can('flows:read') && run.deliveries.some((d) => d.status === 'pending')) {
      dests = (await api('destinations')).destinations.filter((d) => d.flow === run.flow)
        .map((d) => ({ name: d.name, state: d.state, reason: d.reason }));
    }
    return { run, dests };
  }, ({ run, dests }) => {
    const dx = diagnose(run, new Map(dests.map((d) => [d.name, d])));
    const steps = [
      h('li', { class: 'step received' },
        h('div', { class: 'step-head' }, h('h3', {}, 'Received'), h('span', { class: 'muted small' }, fmtTime(run.received_at))),
        h('details', { open: true }, h('summary', {}, 'Payload'), code(run.payload)),
        h('details', {}, h('summary', {}, 'Request metadata'), code(run.meta))),
      ...run.trace.map((t, i) => traceStep(t, i, i === dx.step && dx.tone === 'bad',
        run.trace.slice(0, i).reverse().find((p) => p.output !== undefined)?.output ?? run.payload)),
      ...run.deliveries.map((d) => deliveryStep(d, dx.deliveries.get(d.id))),
    ];
    return [
      h('div', { class: 'title-row' }, h('h1', {}, 'Run ', h('span', { class: 'mono' }, run.id)), pill(run.status)),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Flow'), h('dd', {}, flowLink(run.flow)),
        h('dt', {}, 'Record key'), h('dd', { class: 'key' }, run.record_key || '—'),
        h('dt', {}, 'Received'), h('dd', {}, fmtTime(run.received_at), ' (', ago(run.received_at), ')'),
        h('dt', {}, 'Last change'), h('dd', {}, fmtTime(run.updated_at)),
        run.dedupe_key ? [h('dt', {}, 'Sender’s id'), h('dd', { class: 'mono' }, run.dedupe_key)] : null),
      h('section', { class: `outcome ${dx.tone}`, 'aria-label': 'Outcome', role: 'status' },
        h('h2', {}, { good: 'Delivered', bad: 'Where and why it stopped', warn: 'In progress', neutral: 'Outcome' }[dx.tone]),
        dx.lines.map((l, i) => h(i === 0 ? 'p' : 'p', { class: i === 0 ? 'lead' : 'detail' }, l))),
      runActions(run, () => refresh(true)),
      run.meta?.batch && run.payload && typeof run.payload === 'object' ? reportView(run.payload) : null,
      h('h2', {}, 'Trace'),
      h('ol', { class: 'trace' }, steps),
    ];
  });
  await refresh();
  return { poll: () => refresh() };
}
